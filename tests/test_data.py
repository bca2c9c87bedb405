"""Corpus contexts and where their tokens come from, against the tokenizer run on each file."""

from __future__ import annotations

import pytest
import torch

from featopt.data import ContextSources, corpus_contexts
from featopt.errors import FeatoptError
from featopt.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "b.txt").write_text("The weather today is warm and sunny, with a light wind from the west. " * 4)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("Once upon a time there was a small town by the sea. " * 5)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "c.txt").write_text("Numbers: 1 2 3 and code: def main(): return 42. " * 3)
    return tmp_path


@pytest.mark.parametrize("split", ["train", "eval", "all"])
@pytest.mark.parametrize("max_tokens", [None, 40])
def test_sources_name_the_document_and_position_of_every_token(tokenizer, corpus, split, max_tokens):
    kwargs = dict(split=split, eval_fraction=0.3, max_tokens=max_tokens)
    plain = corpus_contexts(tokenizer, corpus, 8, **kwargs)
    contexts, sources = corpus_contexts(tokenizer, corpus, 8, with_sources=True, **kwargs)
    assert torch.equal(contexts, plain)  # the same contexts as without sources
    assert isinstance(sources, ContextSources)
    assert sources.doc.shape == sources.pos.shape == contexts.shape
    assert sources.doc.dtype == sources.pos.dtype == torch.int32
    assert sources.documents == ["a/one.txt", "b.txt", "c.txt"][: len(sources.documents)]
    ids = {name: tokenizer.encode((corpus / name).read_text(), add_special_tokens=False) for name in sources.documents}
    separators = 0
    for token, doc, pos in zip(contexts.flatten().tolist(), sources.doc.flatten().tolist(), sources.pos.flatten().tolist()):
        if doc < 0:
            assert pos == -1 and token == tokenizer.eos_token_id
            separators += 1
        else:
            whole = ids[sources.documents[doc]]
            cut = len(whole) - round(len(whole) * 0.3)
            assert whole[pos] == token
            assert pos < cut if split == "train" else (pos >= cut if split == "eval" else True)
    assert separators >= (1 if max_tokens is None else 0)
    # positions run on within a document: consecutive tokens of one document are consecutive
    doc, pos = sources.doc.flatten(), sources.pos.flatten()
    same = (doc[1:] == doc[:-1]) & (doc[1:] >= 0)
    assert torch.equal(pos[1:][same], pos[:-1][same] + 1)


def test_without_sources_only_contexts_come_back(tokenizer, corpus):
    assert isinstance(corpus_contexts(tokenizer, corpus, 8), torch.Tensor)


@pytest.mark.parametrize("split", ["train", "eval", "all"])
@pytest.mark.parametrize("max_tokens", [None, 40])
def test_bos_starts_every_context_and_the_rest_is_the_plain_stream(tokenizer, corpus, split, max_tokens):
    """--bos: every row is [BOS] + the next 7 tokens of the stream the tokenizer gives (documents in
    path order, end-of-text between them), the same stream the plain call cuts into rows of 8; the
    BOS column has no source (-1)."""
    L, bos, fraction = 8, 1, 0.3  # an id other than the separator, so the column cannot be mistaken for one
    stream = []
    for name in ("a/one.txt", "b.txt", "c.txt"):
        ids = tokenizer.encode((corpus / name).read_text(), add_special_tokens=False)
        cut = len(ids) - round(len(ids) * fraction)
        stream += {"train": ids[:cut], "eval": ids[cut:], "all": ids}[split] + [tokenizer.eos_token_id]
    kwargs = dict(split=split, eval_fraction=fraction, max_tokens=max_tokens)
    contexts, sources = corpus_contexts(tokenizer, corpus, L, bos=bos, with_sources=True, **kwargs)
    n = len(stream) // (L - 1) if max_tokens is None else -(-max_tokens // L)
    expected = [[bos] + stream[i * (L - 1):(i + 1) * (L - 1)] for i in range(n)]
    assert contexts.tolist() == expected
    assert torch.equal(corpus_contexts(tokenizer, corpus, L, bos=bos, **kwargs), contexts)
    plain = corpus_contexts(tokenizer, corpus, L, **kwargs)
    assert plain.flatten().tolist() == stream[: plain.numel()]  # the plain call reads the same stream
    assert (sources.doc[:, 0] == -1).all() and (sources.pos[:, 0] == -1).all()
    plain_sources = corpus_contexts(tokenizer, corpus, L, with_sources=True, split=split, eval_fraction=fraction)[1]
    for column in ("doc", "pos"):  # the other columns: the plain call's sources of the same stream tokens
        rest, whole = getattr(sources, column)[:, 1:].flatten(), getattr(plain_sources, column).flatten()
        m = min(len(rest), len(whole))  # the BOS rows may reach further into the stream
        assert m > 0 and torch.equal(rest[:m], whole[:m])


def test_bos_needs_one_context_of_corpus_tokens_after_it(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("The cat.")
    n = len(tokenizer.encode("The cat.", add_special_tokens=False)) + 1  # and the separator
    assert corpus_contexts(tokenizer, tmp_path, n + 1, bos=1).tolist() == [[1] + tokenizer.encode("The cat.") + [0]]
    with pytest.raises(FeatoptError, match="after the BOS token"):
        corpus_contexts(tokenizer, tmp_path, n + 2, bos=1)
