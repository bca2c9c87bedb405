"""`featopt compare` against a brute-force loop over the vocabulary with the plain HF forward:
the optimum, every method's activation and fraction, and the property that no single token
beats the exhaustive optimum."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from featopt.commands.compare import (
    METHODS, CompareConfig, CompareRun, FeatureComparison, MethodResult, format_table, fraction_of,
)
from featopt.commands.compare import compare as run
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny

FEATURES = "[:, :, [0-5, 8:12]]"
SPECS = {f"[:, :, {f}]": [f] for f in range(6)} | {"[:, :, 8:12]": [8, 9, 10, 11]}


@pytest.fixture(scope="module")
def tiny64():
    # float64, so the sweep's batching cannot reorder near-equal tokens against the brute force
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")


def _hooked(model, ids, module, inputs=False):
    """The output (or first input) of `module` in a plain HF forward of `ids` (no featopt code)."""
    seen = {}
    if inputs:
        handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("out", args[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    out = seen["out"]
    return out[0] if isinstance(out, tuple) else out


def _brute(adapter, layer, kind="resid_post"):
    """`{spec: [vocab]}`: every token alone through the plain HF model, the spec's mean feature."""
    block = adapter.model.model.layers[layer]
    # resid_post: the block's output; mlp_hidden: the neurons, i.e. the down-projection's input
    module, inputs = (block, False) if kind == "resid_post" else (block.mlp.down_proj, True)
    batches = torch.arange(adapter.vocab_size)[:, None].split(128)  # each row its own sequence
    acts = torch.cat([_hooked(adapter.model, ids, module, inputs)[:, 0] for ids in batches])
    return {spec: acts[:, feats].double().mean(1) for spec, feats in SPECS.items()}


@pytest.fixture(scope="module")
def compared(tiny64, tmp_path_factory):
    config = CompareConfig(model="tiny-llama", layer="0,1", features=FEATURES, steps=20, lr=0.2, top_k=5,
                           out=str(tmp_path_factory.mktemp("compare")), progress=False)
    return run(config, tiny64)


def test_optimum_is_the_brute_force_maximum(tiny64, compared):
    brute = {f"blocks.{layer}.resid_post": _brute(tiny64, layer) for layer in (0, 1)}
    assert [(f.site, f.spec) for f in compared.features] == [(s, spec) for s in brute for spec in SPECS]
    for f in compared.features:
        scores = brute[f.site][f.spec]
        assert f.optimum_token_id == int(scores.argmax())
        assert f.optimum_activation == pytest.approx(float(scores.max()), rel=1e-9)


def test_fractions_are_the_methods_tokens_re_measured_over_the_optimum(tiny64, compared):
    brute = {f"blocks.{layer}.resid_post": _brute(tiny64, layer) for layer in (0, 1)}
    fractions = {m: [] for m in METHODS}
    for f in compared.features:
        scores = brute[f.site][f.spec]
        best, order = float(scores.max()), scores.argsort(descending=True).tolist()
        assert set(f.methods) == set(METHODS)
        for m, o in f.methods.items():
            truth = float(scores[o.token_id])  # an HF forward of the method's own token
            assert o.activation == pytest.approx(truth, rel=1e-5, abs=1e-7)
            if best > 0:
                assert o.fraction == pytest.approx(truth / best, rel=1e-5, abs=1e-7)
                fractions[m].append(truth / best)
            else:
                assert o.fraction is None
            assert o.optimal == (o.token_id == order[0])
            assert o.rank == (order.index(o.token_id) + 1 if order.index(o.token_id) < 5 else None)
            assert o.token == tiny64.tokenizer.decode([o.token_id])
    overall = {s["method"]: s for s in compared.summary if s["site"] == "all"}
    for m in METHODS:
        assert overall[m]["mean_fraction"] == pytest.approx(statistics.fmean(fractions[m]), rel=1e-5)
    document = json.loads((compared.out / "compare.json").read_text(encoding="utf-8"))
    assert document["summary"] == compared.summary
    assert [g["methods"][m]["token_id"] for g in document["features"] for m in METHODS] == \
        [f.methods[m].token_id for f in compared.features for m in METHODS]


def test_no_method_beats_the_exhaustive_optimum(compared):
    # A real property: the optimum is the maximum over every single token, decoded ones included.
    outcomes = [o for f in compared.features for o in f.methods.values()]
    assert all(o.activation <= f.optimum_activation + 1e-6 * max(1, abs(f.optimum_activation))
               for f in compared.features for o in f.methods.values())
    assert all(o.fraction is None or o.fraction <= 1 + 1e-6 for o in outcomes)


def test_one_method_at_the_mlp_neurons(tiny64, tmp_path):
    config = CompareConfig(model="tiny-llama", layer=2, site="mlp_hidden", features=FEATURES, steps=5,
                           methods=["embedding-nearest"], out=str(tmp_path), progress=False)
    result = run(config, tiny64)
    brute = _brute(tiny64, 2, "mlp_hidden")
    for f in result.features:
        assert list(f.methods) == ["embedding-nearest"]
        assert f.optimum_token_id == int(brute[f.spec].argmax())
        o = f.methods["embedding-nearest"]
        assert o.activation == pytest.approx(float(brute[f.spec][o.token_id]), rel=1e-5, abs=1e-7)


def test_table_shows_every_feature_method_and_hit(compared):
    table = format_table(compared)
    for spec in SPECS:
        assert spec in table
    for m in METHODS:
        assert sum(line.startswith(m) for line in table.splitlines()) == 2  # one row per site
        assert sum(f"  {m}  " in line for line in table.splitlines()) == 3  # summary: each site, and all
    hits = sum(o.optimal for f in compared.features for o in f.methods.values())
    assert table.count(") *") == hits


def test_fraction_is_undefined_without_a_positive_optimum():
    assert fraction_of(1.5, 3.0) == 0.5
    assert fraction_of(-1.0, 2.0) == -0.5
    assert fraction_of(-1.0, -0.5) is None and fraction_of(0.0, 0.0) is None
    outcome = MethodResult("embedding-pinv", 7, "x", -1.0, None, 0.5, False, None)
    table = format_table(CompareRun([FeatureComparison("blocks.0.resid_post", "[:, :, 0]", 3, "y", -0.5,
                                                       {"embedding-pinv": outcome})],
                                    [{"site": "blocks.0.resid_post", "method": "embedding-pinv", "features": 1,
                                      "with_fraction": 0, "mean_fraction": None, "min_fraction": None,
                                      "optimal_share": 0.0}], None))
    assert "'x' -1 (n/a)" in table and "0/1" in table


@pytest.mark.parametrize("bad", [
    dict(features="[:, 1, 0]"),  # position 1 needs a two-token input
    dict(features="[:, 0-1, 0]"),
    dict(features="[:, :, 64]"),  # tiny-llama's residual stream has 64 features
    dict(layer=3),
    dict(methods=["embedding-pinv", "beam"]),
    dict(methods=["gcg", "gcg"]),
    dict(methods=[]),
    dict(gcg_width=0),
    dict(site="resid_post,mlp_out"),
    dict(steps=0),
])
def test_bad_input_raises_before_any_search(tiny64, tmp_path, monkeypatch, bad):
    import featopt.commands.compare as command

    monkeypatch.setattr(command, "exhaustive", lambda *a, **k: pytest.fail("searched despite bad input"))
    with pytest.raises(FeatoptError):
        run(CompareConfig(**{**dict(model="tiny-llama", out=str(tmp_path), progress=False), **bad}), tiny64)


def test_with_bos_every_method_scores_its_token_after_the_bos_as_a_plain_forward(tiny64, tmp_path):
    """--bos: the optimum is the brute-force best token t of [BOS, t] at t's position, and every
    method's activation is the plain forward of [BOS, its token]."""
    bos = tiny64.tokenizer.bos_token_id
    block = tiny64.model.model.layers[1]
    tokens = torch.arange(tiny64.vocab_size)[:, None]
    acts = torch.cat([_hooked(tiny64.model, torch.cat([torch.full_like(ids, bos), ids], 1), block)[:, 1]
                      for ids in tokens.split(128)])
    brute = {spec: acts[:, feats].double().mean(1) for spec, feats in SPECS.items()}
    result = run(CompareConfig(model="tiny-llama", layer="1", features=FEATURES, steps=10, lr=0.2, top_k=5, bos=True,
                               gcg_steps=4, gcg_width=64, gcg_topk=64, out=str(tmp_path), progress=False), tiny64)
    assert not tiny64.bos  # the caller's adapter is left as it was
    assert [f.spec for f in result.features] == list(SPECS)
    for f in result.features:
        scores = brute[f.spec]
        assert f.optimum_token_id == int(scores.argmax())
        assert f.optimum_activation == pytest.approx(float(scores.max()), rel=1e-9)
        for m, o in f.methods.items():
            assert o.activation == pytest.approx(float(scores[o.token_id]), rel=1e-5, abs=1e-7), m
