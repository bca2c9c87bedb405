"""Corpus contexts and where their tokens come from, against the tokenizer run on each file."""

from __future__ import annotations

import pytest
import torch

from featopt.data import ContextSources, corpus_contexts
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
