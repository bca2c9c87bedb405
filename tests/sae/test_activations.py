"""The activation stream: every row once per buffer, a pure function of the step, split exactly
between ranks, and the same from the cache as from the model."""

from __future__ import annotations

import torch

from featopt.data import corpus_contexts
from featopt.models import load_model
from featopt.dictionaries.activations import ActivationStream, CacheSource, ModelSource, write_cache
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


def test_bos_cache_holds_a_plain_forward_of_bos_then_the_corpus_and_training_checks_it(tmp_path):
    """`sae cache --bos`: every context is [BOS] + 15 corpus tokens, its activations those of a plain
    HF forward with a hook on the block; the cache says so, and `sae train` refuses a cache whose
    BOS setting is not the run's."""
    import json

    import pytest

    from featopt.errors import FeatoptError
    from featopt.commands.sae_cache import CacheConfig, cache
    from featopt.commands.sae_train import TrainConfig, train

    adapter = load_model("tiny-llama")
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 40)
    tok = adapter.tokenizer
    stream = tok.encode((text / "a.txt").read_text(), add_special_tokens=False, verbose=False) + [tok.eos_token_id]
    n = len(stream) // 15
    ids = torch.tensor([[tok.bos_token_id] + stream[i * 15:(i + 1) * 15] for i in range(n)])
    seen = []
    hook = adapter.model.model.layers[1].register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            adapter.model(input_ids=ids)
    finally:
        hook.remove()
    settings = dict(model="tiny-llama", site="blocks.1.resid_post", corpus=str(text), split="all", context_length=16,
                    progress=False)
    cache(CacheConfig(**settings, bos=True, batch_contexts=5, out=str(tmp_path / "bos")), adapter)
    assert not adapter.bos  # the caller's adapter is left as it was
    cached = CacheSource(tmp_path / "bos")
    assert cached.meta["bos"] is True and cached.meta["contexts_shape"] == [n, 16]
    assert torch.equal(torch.load(tmp_path / "bos" / "contexts.pt"), ids)
    torch.testing.assert_close(cached.acts[adapter.site("blocks.1.resid_post")], seen[0])
    cache(CacheConfig(**settings, out=str(tmp_path / "plain")), adapter)
    assert json.loads((tmp_path / "plain" / "activations.json").read_text())["bos"] is False
    training = dict(model="tiny-llama", site="blocks.1.resid_post", tokens=64, context_length=16, batch_size=32,
                    eval_contexts=0, progress=False, out=str(tmp_path / "sae"))
    for cached, bos in (("bos", False), ("plain", True)):
        with pytest.raises(FeatoptError, match="--bos"):
            train(TrainConfig(**training, activations=str(tmp_path / cached), bos=bos), adapter)
    assert not (tmp_path / "sae").exists()
