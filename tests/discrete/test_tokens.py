"""Which tokens a search may place, against a brute-force decode of every id of the tiny
tokenizer; the context-length check against the model config's own limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.discrete.tokens import allowed_ids, check_length


@pytest.fixture(scope="module")
def gpt2():
    model, tok = build_tiny("tiny-gpt2")
    return ModelAdapter(model, tok, name="tiny-gpt2")


def _specials(tok):
    return set(tok.all_special_ids) | set(tok.get_added_vocab().values())


def _brute(tok, vocab, allow):
    special = _specials(tok) | set(range(len(tok), vocab))  # embedding rows past the tokenizer
    keep = []
    for t in range(vocab):
        if allow != "all" and t in special:
            continue
        if allow == "ascii":
            text = tok.decode([t]) if t < len(tok) else ""
            if not (text and text.isascii() and text.isprintable()):
                continue
        keep.append(t)
    return keep


@pytest.mark.parametrize("allow", ["all", "no-special", "ascii"])
def test_allowed_ids_against_a_decode_of_every_id(gpt2, allow):
    got = allowed_ids(gpt2, allow)
    expected = _brute(gpt2.tokenizer, gpt2.vocab_size, allow)
    assert got.tolist() == expected
    assert got.dtype == torch.long


def test_the_three_sets_are_nested_and_differ_on_the_tiny_tokenizer(gpt2):
    every, plain, ascii_ = (set(allowed_ids(gpt2, a).tolist()) for a in ("all", "no-special", "ascii"))
    assert ascii_ < plain < every
    assert 0 in every and 0 not in plain  # <|endoftext|>
    # the byte tokens past ASCII decode to U+FFFD alone: allowed as tokens, not as ASCII text
    lone = [t for t in range(len(gpt2.tokenizer)) if gpt2.tokenizer.decode([t]) == "\ufffd"]
    assert lone and set(lone) <= plain and not set(lone) & ascii_
    assert {gpt2.tokenizer.encode(w)[0] for w in (" the", "a", "!")} <= ascii_


def test_embedding_rows_past_the_tokenizer_are_not_text():
    model, tok = build_tiny("tiny-gpt2")
    model.resize_token_embeddings(len(tok) + 8)
    adapter = ModelAdapter(model, tok, name="tiny-gpt2-padded")
    assert adapter.vocab_size == len(tok) + 8
    assert allowed_ids(adapter, "all").tolist() == list(range(len(tok) + 8))
    for allow in ("no-special", "ascii"):
        assert allowed_ids(adapter, allow).tolist() == _brute(tok, len(tok) + 8, allow)
        assert max(allowed_ids(adapter, allow).tolist()) < len(tok)


@pytest.mark.parametrize("allow", ["all", "no-special", "ascii"])
def test_candidates_intersect_the_allowed_set(gpt2, allow):
    gen = torch.Generator().manual_seed(0)
    candidates = torch.cat([torch.tensor([0, 0, 255, 260, 260]), torch.randint(0, gpt2.vocab_size, (60,), generator=gen)])
    got = allowed_ids(gpt2, allow, candidates)
    expected = sorted(set(candidates.tolist()) & set(_brute(gpt2.tokenizer, gpt2.vocab_size, allow)))
    assert got.tolist() == expected


@pytest.mark.parametrize("allow, candidates", [("no-special", [0]), ("ascii", [0]), ("ascii", [250, 251, 0])])
def test_an_empty_set_raises_a_sentence_naming_allow(gpt2, allow, candidates):
    with pytest.raises(FeatoptError) as error:
        allowed_ids(gpt2, allow, torch.tensor(candidates))
    message = str(error.value)
    assert "--allow" in message and "--candidates" in message and message.endswith(".")
    assert "\n" not in message


def test_an_unknown_allow_raises_naming_allow(gpt2):
    with pytest.raises(FeatoptError, match="--allow 'printable' is not known"):
        allowed_ids(gpt2, "printable")


def test_check_length_against_the_config_limit(gpt2):
    limit = gpt2.model.config.n_positions
    assert gpt2.context_limit == limit == 64
    check_length(gpt2, 0, limit)
    check_length(gpt2, 5, limit - 5)
    for prefix, tokens in ((0, limit + 1), (5, limit - 4), (0, 100000)):
        with pytest.raises(FeatoptError) as error:
            check_length(gpt2, prefix, tokens)
        message = str(error.value)
        assert f"--tokens {tokens}" in message and f"at most {limit}" in message
        assert f"use at most {limit - prefix} tokens" in message


def test_check_length_of_a_model_without_a_limit_passes(gpt2, monkeypatch):
    monkeypatch.setattr(gpt2.model, "config", SimpleNamespace())  # a config that names no limit
    assert gpt2.context_limit is None
    check_length(gpt2, 10, 10**6)


def test_the_bos_token_counts_against_the_context(gpt2, monkeypatch):
    monkeypatch.setattr(gpt2, "_bos", True)
    gpt2.check_positions(64, "--tokens 63 after the BOS", "x")
    with pytest.raises(FeatoptError, match=r"needs 65 positions \(the BOS token of --bos included\), but .* at most 64"):
        gpt2.check_positions(65, "--tokens 64 after the BOS", "x")
