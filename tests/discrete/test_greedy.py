"""The cached greedy search against the document's `search_maximal`, copied faithfully and run
uncached over the plain HF model."""

from __future__ import annotations

import pytest
import torch
from search_reference import resid_post

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.results import read_results
from featopt.commands.search import GreedyConfig
from featopt.commands.search import greedy as run


@torch.no_grad()
def search_maximal(a_model, vocab_size, n_tokens, feature, batch_size=1000, variant="last", start=()):
    """Source document 000's `search_maximal` (and, with `variant="sum"`, its modified version
    that sums the feature over all positions), kept line for line: every candidate sequence is run
    in full, nothing cached. `a_model(tokens)` gives the site's activations `[batch, tokens, width]`;
    a slice `feature` is averaged, as the notation defines combined features. Returns token ids."""
    maximal_tokens = list(start)
    for t in range(n_tokens):
        activations = []
        for i in range(0, vocab_size, batch_size):
            token_batch = torch.tensor([j for j in range(i, min(i + batch_size, vocab_size))])
            token_batch = token_batch.reshape((min(batch_size, vocab_size - i), 1))
            maximal_tensor = torch.tensor(maximal_tokens, dtype=torch.long).repeat(min(batch_size, vocab_size - i), 1)
            if len(maximal_tokens) > 0:  # the document's `t > 0`, with an optional fixed start
                greedy_tokens = torch.cat((maximal_tensor, token_batch), dim=1).int()
            else:
                greedy_tokens = token_batch
            output = a_model(greedy_tokens)
            if isinstance(feature, slice):  # a combined feature: its mean, as one feature
                output, index = output[:, :, feature].mean(-1, keepdim=True), 0
            else:
                index = feature
            if variant == "last":
                activations += output[:, -1, index].flatten()
            else:
                focus = output[:, :, index]
                activations += torch.sum(focus, dim=-1)
        activations = torch.tensor(activations)
        token_int = torch.argmax(activations)
        maximal_tokens.append(int(token_int))
    return maximal_tokens


def _config(tmp_path, **kw):
    base = dict(model="tiny-llama", layer=0, features="[:, :, 0-1]", tokens=3, out=str(tmp_path / "run"), progress=False)
    return GreedyConfig(**{**base, **kw})


def _feature(spec):
    field = spec.split(",")[-1].strip(" ]")
    lo, _, hi = field.partition(":")
    return slice(int(lo), int(hi)) if hi else int(lo)


def test_cached_search_returns_the_tokens_of_the_uncached_document_loop(tiny64, tmp_path):
    config = _config(tmp_path, layer="0,2", features="[:, :, [0-3, 8:12]]", tokens=4, variant="both", batch_size=100)
    results = run(config, tiny64).results
    assert len(results) == 2 * 2 * 5
    for r in results:
        layer = int(r.site.split(".")[1])
        variant = r.method.removeprefix("greedy-")
        expected = search_maximal(lambda ids: resid_post(tiny64.model, ids, layer), tiny64.vocab_size, 4,
                                  _feature(r.spec), variant=variant)
        assert r.token_ids == expected, (r.site, r.spec, r.method)
        with torch.no_grad():
            acts = resid_post(tiny64.model, torch.tensor([expected]), layer)[0]
        per_position = acts[:, _feature(r.spec)]
        per_position = per_position.mean(-1) if per_position.dim() == 2 else per_position
        value = per_position[-1] if variant == "last" else per_position.sum()
        assert r.activation == pytest.approx(float(value), rel=1e-9)


def test_a_fixed_start_is_continued(tiny64, tmp_path):
    start = tiny64.encode(" the sea").tolist()
    config = _config(tmp_path, layer=1, features="[:, :, [5, 0:3]]", prefix=" the sea", variant="both")
    results = run(config, tiny64).results
    for r in results:
        variant = r.method.removeprefix("greedy-")
        expected = search_maximal(lambda ids: resid_post(tiny64.model, ids, 1), tiny64.vocab_size, 3,
                                  _feature(r.spec), variant=variant, start=start)
        assert r.token_ids == expected and r.extra["prefix_length"] == 3


def test_every_family_with_its_cache(family_model, tmp_path):
    family, model = family_model
    adapter = ModelAdapter(model.double(), name=family)

    def a_model(ids):  # layer 1 of 3, so hidden_states[2] is a block output before any final norm
        return model(input_ids=ids, output_hidden_states=True).hidden_states[2]

    config = _config(tmp_path, layer=1, features="[:, :, [0-2, 4:8]]", variant="both", batch_size=50)
    results = run(config, adapter).results
    for r in results:
        variant = r.method.removeprefix("greedy-")
        expected = search_maximal(a_model, adapter.vocab_size, 3, _feature(r.spec), variant=variant)
        assert r.token_ids == expected, (family, r.spec, r.method)


def test_candidates_run_one_new_token_after_a_prefix_computed_once_per_step(tiny64, tmp_path, monkeypatch):
    calls, prefixes = [], []
    real_run, real_prefix = tiny64.run, tiny64.prefix
    monkeypatch.setattr(tiny64, "run", lambda sites, **kw: calls.append(tuple(kw["input_ids"].shape))
                        or real_run(sites, **kw))
    monkeypatch.setattr(tiny64, "prefix", lambda sites, ids: prefixes.append(tuple(ids.shape)) or real_prefix(sites, ids))
    last = run(_config(tmp_path / "last", features="[:, :, 0-3]", tokens=3, batch_size=512), tiny64).results
    n_last = len(calls)
    # one batched forward of the distinct prefixes per step after the first (4 problems: at most 4)
    assert [s[1] for s in prefixes] == [1, 2] and all(s[0] <= 4 for s in prefixes)
    candidates = calls[:-1]  # the last call re-measures the found inputs
    assert sum(s[0] for s in candidates) - sum(s[0] for s in prefixes) == 512 * (1 + prefixes[0][0] + prefixes[1][0])
    assert all(s[1] == 1 for s in candidates if s not in prefixes)
    calls[:] = []
    config = _config(tmp_path / "both", features="[:, :, 0-3]", tokens=3, batch_size=512, variant="both")
    both = run(config, tiny64).results
    # the variants agree here, so running both shares every row: no more forwards than one variant
    assert [r.token_ids for r in both if r.method == "greedy-sum"] == [r.token_ids for r in last]
    assert len(calls) == n_last  # and one re-measuring forward for both variants' inputs


def test_results_and_table(tiny64, tmp_path):
    found = run(_config(tmp_path, layer="0,1", variant="both"), tiny64)
    meta, back = read_results(tmp_path / "run")
    assert meta["method"] == "greedy"
    assert [r.method for r in back] == (["greedy-last"] * 2 + ["greedy-sum"] * 2) * 2
    assert all(len(r.extra["steps"]) == 3 and len(r.extra["per_position"]) == 3 for r in back)
    lines = found.table().splitlines()
    assert lines[0].split() == ["[:,", ":,", "0]", "[:,", ":,", "1]"]
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["blocks.0.resid_post", "greedy-last"], ["blocks.0.resid_post", "greedy-sum"],
        ["blocks.1.resid_post", "greedy-last"], ["blocks.1.resid_post", "greedy-sum"]]
    assert lines[5:] == [f"blocks.{layer}.resid_post: last and sum give the same tokens for 2/2 problems, 6/6 positions"
                         for layer in (0, 1)]  # the tiny model's variants agree (see the cached-search test)
    assert meta["variant_agreement"]["blocks.1.resid_post"] == {
        "problems": 2, "same_tokens": 2, "positions": 6, "same_positions": 6}


def test_agreement_counts_tokens_and_positions():
    from featopt.results import FeatureResult
    from featopt.discrete.greedy import agreement

    def result(method, spec, ids):
        return FeatureResult(spec=spec, site="blocks.0.resid_post", method=method, objective="", token_ids=ids,
                             tokens=[], text="", activation=0.0)

    rows = [result("greedy-last", "a", [1, 2, 3]), result("greedy-last", "b", [4, 5, 6]),
            result("greedy-sum", "a", [1, 2, 3]), result("greedy-sum", "b", [4, 9, 6])]
    assert agreement(rows) == {"blocks.0.resid_post": {"problems": 2, "same_tokens": 1, "positions": 6, "same_positions": 5}}
    assert agreement(rows[:2]) == {}


@pytest.mark.parametrize("kw, match", [
    (dict(features="[:, 2, 0]"), "position field"),
    (dict(variant="mean"), "variant"),
    (dict(tokens=0), "tokens"),
    (dict(batch_size=-1), "batch_size"),
])
def test_bad_settings_say_what_is_allowed(tiny64, tmp_path, kw, match):
    with pytest.raises(FeatoptError, match=match):
        run(_config(tmp_path, **kw), tiny64)
