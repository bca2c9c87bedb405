"""The activation stream: every row once per buffer, a pure function of the step, split exactly
between ranks, and the same from the cache as from the model."""

from __future__ import annotations

import torch

from featopt.data import corpus_contexts
from featopt.models import load_model
from featopt.sae.activations import ActivationStream, CacheSource, ModelSource, write_cache
from tests.sae.synthetic import SITE, SparseSource


def _stream(source, **kwargs):
    settings = dict(batch_tokens=32, buffer_batches=4, seed=3, skip_first=1)
    settings.update(kwargs)
    return ActivationStream(source, source.n_contexts, source.acts.shape[1], **settings)


def test_batches_are_distinct_rows_of_the_buffer_contexts_without_position_0():
    source = SparseSource(n_contexts=20, context_length=9)
    stream = _stream(source)
    contexts = stream.buffer_contexts(0)
    allowed = source.acts[contexts][:, 1:].reshape(-1, source.acts.shape[-1])  # brute force: every row of the buffer
    rows = torch.cat([stream.batch(i)[SITE] for i in range(stream.buffer_batches)])
    assert rows.shape == (stream.buffer_batches * 32, 16)
    assert len(torch.unique(rows, dim=0)) == len(rows)  # no row twice
    # every drawn row is a row of the buffer's contexts at positions >= 1
    match = (rows[:, None, :] == allowed[None]).all(-1).any(-1)
    assert bool(match.all())


def test_epochs_cover_every_context_once_before_repeating():
    source = SparseSource(n_contexts=10, context_length=5)
    stream = _stream(source, batch_tokens=8, buffer_batches=1)  # 2 contexts per buffer
    seen = torch.cat([stream.buffer_contexts(g) for g in range(5)])
    assert sorted(seen.tolist()) == list(range(10))


def test_the_stream_is_a_function_of_the_step():
    source = SparseSource()
    a, b = _stream(source), _stream(source)
    order = [5, 0, 9, 4, 5]
    for step in order:  # a fresh stream asked out of order gives the same batches
        torch.testing.assert_close(a.batch(step)[SITE], _stream(source).batch(step)[SITE])
    torch.testing.assert_close(b.batch(7)[SITE], a.batch(7)[SITE])


def test_two_ranks_split_each_global_batch_exactly():
    source = SparseSource(n_contexts=30, context_length=7)
    one = _stream(source)
    ranks = [_stream(source, world=2, rank=r) for r in range(2)]
    for step in range(6):
        whole = one.batch(step)[SITE]
        parts = torch.cat([s.batch(step)[SITE] for s in ranks])
        assert len(parts) == len(whole)
        key = lambda t: t[torch.argsort(t[:, 0] * 1e3 + t[:, 1])]  # noqa: E731 - compare as multisets
        torch.testing.assert_close(key(parts), key(whole))


def test_a_cache_gives_the_stream_of_the_model(tmp_path):
    adapter = load_model("tiny-llama")
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 40)
    contexts = corpus_contexts(adapter.tokenizer, text, 16)
    site = adapter.site("blocks.1.resid_post")
    model = ModelSource(adapter, contexts, [site], batch_contexts=3)
    write_cache(model, tmp_path / "cache", {}, shard_contexts=5, progress=False)
    cache = CacheSource(tmp_path / "cache")
    # the cache holds exactly what a plain HF forward computes
    with torch.no_grad():
        hidden = adapter.model(contexts, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(cache.acts[site], hidden)
    settings = dict(batch_tokens=20, buffer_batches=3, seed=1)
    a = ActivationStream(model, len(contexts), 16, **settings)
    b = ActivationStream(cache, len(contexts), 16, **settings)
    for step in range(5):
        torch.testing.assert_close(a.batch(step)[site], b.batch(step)[site])
