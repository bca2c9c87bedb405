"""The exhaustive sweep against a brute-force loop over the vocabulary with the plain HF forward."""

from __future__ import annotations

import copy

import pytest
import torch
from search_reference import mlp_hidden, resid_post

from featopt.errors import FeatoptError
from featopt.results import read_results
from featopt.commands.search import ExhaustiveConfig
from featopt.commands.search import exhaustive as run

PREFIX = " the sea"  # 3 tokens in the tiny tokenizer, so the candidate sits at position 3


def _config(tmp_path, **kw):
    base = dict(model="tiny-llama", layer=0, features="[:, :, 0-3]", top_k=5, out=str(tmp_path / "run"), progress=False)
    return ExhaustiveConfig(**{**base, **kw})


def _best(scores, k):
    """The k best token ids of `scores [vocab]` by plain sorting (ties to the lower id)."""
    return [t for _, t in sorted((-float(v), t) for t, v in enumerate(scores))[:k]]


@pytest.fixture(scope="module")
def brute(tiny64):
    """Per layer, `[vocab, tokens, d_model]`: every token alone, and every token after PREFIX."""
    prefix = tiny64.encode(PREFIX).tolist()
    alone = {layer: [] for layer in range(3)}
    after = {layer: [] for layer in range(3)}
    with torch.no_grad():
        for start in range(0, tiny64.vocab_size, 128):  # each row is its own sequence: rows never interact
            tokens = torch.arange(start, min(start + 128, tiny64.vocab_size))[:, None]
            for layer in range(3):
                alone[layer].append(resid_post(tiny64.model, tokens, layer))
                full = torch.cat([torch.tensor(prefix).expand(len(tokens), -1), tokens], 1)
                after[layer].append(resid_post(tiny64.model, full, layer))
    return {"alone": {k: torch.cat(v) for k, v in alone.items()}, "prefix": {k: torch.cat(v) for k, v in after.items()}}


def _check(results, expected_scores, k=5):
    """`expected_scores[(site, spec)] = [vocab]` brute-force scores; results must match exactly."""
    assert len(results) == len(expected_scores)
    for r in results:
        scores = expected_scores[(r.site, r.spec)]
        best = _best(scores, k)
        assert r.extra["top_k"]["token_ids"] == best, (r.site, r.spec)
        assert r.token_ids[-1] == best[0]
        got = torch.tensor(r.extra["top_k"]["activations"], dtype=torch.float64)
        torch.testing.assert_close(got, scores[best], rtol=1e-9, atol=1e-12)
        assert r.activation == pytest.approx(float(scores[best[0]]), rel=1e-9, abs=1e-12)


def test_every_feature_of_two_layers_in_one_sweep(tiny64, brute, tmp_path, monkeypatch):
    calls = []
    real_run = tiny64.run
    monkeypatch.setattr(tiny64, "run", lambda sites, **kw: calls.append(kw["input_ids"].shape) or real_run(sites, **kw))
    results = run(_config(tmp_path, layer="0,2", features="[:, :, 0-63]", batch_size=512), tiny64).results
    # one forward over the whole vocabulary reads both layers; then one re-measuring forward of every
    # problem's best token, both layers' at once
    assert calls[0] == (512, 1) and len(calls) == 2 and calls[1] == (128, 1)
    _check(results, {(f"blocks.{layer}.resid_post", f"[:, :, {f}]"): brute["alone"][layer][:, 0, f]
                     for layer in (0, 2) for f in range(64)})


def test_several_site_kinds_in_one_sweep(tiny64, brute, tmp_path):
    config = _config(tmp_path, layer="0,1", site="resid_post,mlp_hidden", features="[:, :, [0-2, 40:64]]")
    results = run(config, tiny64).results
    with torch.no_grad():
        tokens = torch.arange(tiny64.vocab_size)[:, None]
        neurons = {layer: mlp_hidden(tiny64.model, tokens, layer)[:, 0] for layer in (0, 1)}
    expected = {}
    for layer in (0, 1):
        for name, acts in (("resid_post", brute["alone"][layer][:, 0]), ("mlp_hidden", neurons[layer])):
            for feat, spec in ((0, "0"), (1, "1"), (2, "2"), (slice(40, 64), "40:64")):
                column = acts[:, feat]
                expected[(f"blocks.{layer}.{name}", f"[:, :, {spec}]")] = column.mean(1) if column.dim() == 2 else column
    _check(results, expected)
    kinds_then_layers = ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.0.mlp_hidden", "blocks.1.mlp_hidden"]
    assert [r.site for r in results[::4]] == kinds_then_layers


def test_combined_slices_are_the_mean_of_their_features(tiny64, brute, tmp_path):
    results = run(_config(tmp_path, layer=1, features="[:, :, [0:4, 10:30, :]]"), tiny64).results
    acts = brute["alone"][1][:, 0]
    _check(results, {("blocks.1.resid_post", "[:, :, 0:4]"): acts[:, 0:4].mean(1),
                     ("blocks.1.resid_post", "[:, :, 10:30]"): acts[:, 10:30].mean(1),
                     ("blocks.1.resid_post", "[:, :, :]"): acts.mean(1)})


def test_after_a_prefix_positions_index_the_whole_sequence(tiny64, brute, tmp_path):
    spec = "[:, [:, 3, 1:4], [2, 5:9]]"
    results = run(_config(tmp_path, layer="1", features=spec, prefix=PREFIX), tiny64).results
    acts = brute["prefix"][1]  # [vocab, 4, d]
    expected = {}
    for pos, pos_spec in ((slice(0, 4), ":"), (slice(3, 4), "3"), (slice(1, 4), "1:4")):
        for feat, feat_spec in ((slice(2, 3), "2"), (slice(5, 9), "5:9")):
            expected[("blocks.1.resid_post", f"[:, {pos_spec}, {feat_spec}]")] = acts[:, pos, feat].mean((1, 2))
    _check(results, expected)
    assert all(r.token_ids[:3] == tiny64.encode(PREFIX).tolist() and r.extra["prefix_length"] == 3 for r in results)


def test_candidates_restrict_the_vocabulary(tiny64, brute, tmp_path):
    result = run(_config(tmp_path, features="[:, :, 7]", candidates="100-199,300", top_k=3), tiny64).results[0]
    scores = brute["alone"][0][:, 0, 7]
    allowed = list(range(100, 200)) + [300]
    expected = [allowed[i] for i in _best(scores[allowed], 3)]
    assert result.extra["top_k"]["token_ids"] == expected


def test_batch_size_does_not_change_the_results(tiny64, tmp_path):
    runs = [run(_config(tmp_path / str(b), layer="0,1", features="[:, :, [0-9, 0:8]]", batch_size=b), tiny64).results
            for b in (0, 7, 100, 512)]
    for other in runs[1:]:
        assert [r.extra["top_k"]["token_ids"] for r in other] == [r.extra["top_k"]["token_ids"] for r in runs[0]]
        for a, b in zip(other, runs[0]):  # rounding may differ with the batch shape, in the last bits only
            assert a.extra["top_k"]["activations"] == pytest.approx(b.extra["top_k"]["activations"], rel=1e-12)


def test_out_of_memory_halves_the_batch_and_retries(tiny64, tmp_path, monkeypatch):
    expected = run(_config(tmp_path / "plain", batch_size=128), tiny64).results
    sizes, real_run = [], tiny64.run

    def flaky(sites, **kw):
        sizes.append(len(kw["input_ids"]))
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(sites, **kw)

    monkeypatch.setattr(tiny64, "run", flaky)
    results = run(_config(tmp_path / "flaky", batch_size=128), tiny64).results
    assert sizes[:5] == [128, 64, 64, 64, 64]  # the failed batch again at half size, then onwards at half size
    assert sum(sizes[1:-1]) == tiny64.vocab_size  # every candidate exactly once (the last call re-measures)
    assert [r.extra["top_k"]["token_ids"] for r in results] == [r.extra["top_k"]["token_ids"] for r in expected]


def test_other_errors_and_oom_at_batch_one_are_raised(tiny64, tmp_path, monkeypatch):
    def broken(sites, **kw):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tiny64, "run", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(_config(tmp_path), tiny64)

    def oom(sites, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(tiny64, "run", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(_config(tmp_path, batch_size=4), tiny64)


def test_isolated_block_equals_the_block_alone_in_a_truncated_hf_model(tiny64, tmp_path):
    results = run(_config(tmp_path, layer=2, features="[:, :, 0-7]", isolated=True), tiny64).results
    alone = copy.deepcopy(tiny64.model)
    alone.model.layers = torch.nn.ModuleList([alone.model.layers[2]])
    alone.config.num_hidden_layers = 1
    with torch.no_grad():
        acts = resid_post(alone, torch.arange(tiny64.vocab_size)[:, None], 0)[:, 0]
    _check(results, {("blocks.2.resid_post", f"[:, :, {f}]"): acts[:, f] for f in range(8)})


def test_results_are_written_in_the_common_format(tiny64, tmp_path):
    results = run(_config(tmp_path, features="[:, :, 3-4]"), tiny64).results
    meta, back = read_results(tmp_path / "run")
    assert meta["method"] == "exhaustive" and meta["sites"] == ["blocks.0.resid_post"]
    assert [r.token_ids for r in back] == [r.token_ids for r in results]
    assert all(r.method == "exhaustive" and r.text == tiny64.decode(r.token_ids) for r in back)


@pytest.mark.parametrize("kw, match", [
    (dict(prefix=PREFIX, features="[:, 1, 0]"), "only prefix positions"),
    (dict(features="[:, 1, 0]"), "out of range"),
    (dict(prefix=PREFIX, isolated=True), "isolated"),
    (dict(layer="0,1", isolated=True), "one layer"),
    (dict(layer="0,9"), "layer 9 is out of range"),
    (dict(layer="1-"), "malformed"),
    (dict(top_k=0), "top_k"),
    (dict(candidates="0-999"), "token id 999 is out of range"),
])
def test_bad_settings_say_what_is_allowed(tiny64, tmp_path, kw, match):
    with pytest.raises(FeatoptError, match=match):
        run(_config(tmp_path, **kw), tiny64)


def test_bos_is_a_fixed_first_token_and_is_recorded(tiny64, tmp_path):
    """With --bos every candidate follows the BOS token: scores are HF forwards of [BOS, t]."""
    import json

    adapter = copy.copy(tiny64)
    adapter.bos = True
    bos = adapter.tokenizer.bos_token_id
    results = run(_config(tmp_path, layer="1", features="[:, 1, 0-3]", bos=True), adapter).results
    with torch.no_grad():
        tokens = torch.arange(adapter.vocab_size)[:, None]
        acts = resid_post(adapter.model, torch.cat([torch.full_like(tokens, bos), tokens], 1), 1)  # [vocab, 2, d]
    _check(results, {("blocks.1.resid_post", f"[:, 1, {f}]"): acts[:, 1, f] for f in range(4)})
    assert all(r.token_ids[0] == bos and len(r.token_ids) == 2 and r.extra["prefix_length"] == 1 for r in results)
    run_meta, back = read_results(tmp_path / "run")
    assert run_meta["config"]["bos"] is True and all(r.bos for r in back)
    # a results file written before the field existed reads back as "no BOS"
    document = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in document["results"]:
        del r["bos"]
    (tmp_path / "old.json").write_text(json.dumps(document))
    assert not any(r.bos for r in read_results(tmp_path / "old.json")[1])


def test_the_configs_bos_applies_to_a_given_adapter_without_changing_it(tiny64, tmp_path):
    """A caller's adapter without BOS, a config with --bos: the run is after the BOS token (as
    the processes of --devices, which load from the config, see it), and the caller's adapter
    keeps its setting."""
    assert not tiny64.bos
    bos = tiny64.tokenizer.bos_token_id
    results = run(_config(tmp_path, layer="1", features="[:, 1, 0-1]", bos=True), tiny64).results
    with torch.no_grad():
        tokens = torch.arange(tiny64.vocab_size)[:, None]
        acts = resid_post(tiny64.model, torch.cat([torch.full_like(tokens, bos), tokens], 1), 1)
    _check(results, {("blocks.1.resid_post", f"[:, 1, {f}]"): acts[:, 1, f] for f in range(2)})
    assert all(r.token_ids[0] == bos and r.bos for r in results) and not tiny64.bos


def test_the_library_sweep_binds_an_objective_given_unbound(tiny64, brute):
    """`featopt.discrete.exhaustive.exhaustive(adapter, maximize(...))`: the widths come from the model."""
    from featopt.discrete.exhaustive import exhaustive
    from featopt.objectives import maximize

    topk = exhaustive(tiny64, maximize("[:, :, 0-7]", "blocks.1.resid_post"), k=3, progress=False)
    for f in range(8):
        assert topk.ids[:, f].tolist() == _best(brute["alone"][1][:, 0, f], 3)
