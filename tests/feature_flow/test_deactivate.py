"""Deactivation against hand-written forward hooks on tiny-llama's HF modules and a float64
re-implementation of the topk encoding: nothing here goes through the adapter's hooks or
`scale_latents`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from featopt.errors import FeatoptError
from featopt.feature_flow.deactivate import deactivate, r_sweep
from featopt.feature_flow.deactivate_report import format_deactivation, plot_methods, plot_sweep, record
from featopt.feature_flow.events import sample_events
from featopt.feature_flow.groups import GROUPS as _GROUPS, ROLES as SLOTS, predecessor_key as slot_key

N, T = 4, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 64-wide model: extra threads only contend with each other (and any background job).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (N, T), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def events(flow_set, llama, contexts):
    return sample_events(flow_set, llama, contexts, max_events=24, seed=3, batch_size=3)


# ----------------------------------------------------------------------- the independent computation
def enc64(sae, x):
    """topk encoding in float64: relu of the k largest of `(x - b_dec) W_enc + b_enc`, others 0."""
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    top = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))


def module_of(llama, key):
    layer, module = key
    block = llama.model.model.layers[layer]
    return {"res": block, "mlp": block.mlp, "att": block.self_attn}[module]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def hand_forward(llama, flow, ids, scales=(), read=(), full=False):
    """Forward of `ids [B, T]` with, for each `(key, latents [B], r [B])` in `scales`, the output
    of `key`'s HF module replaced by `x - (1 - r) z_p(x) W_dec[p]` row by row; returns the outputs
    of the modules of `read` keys and the logits (full forward) or None."""
    handles, seen = [], {}

    def subtract(sae, latents, r):
        def hook(module, args, output):
            x = first(output)
            z = enc64(sae, x)  # [B, T, d_sae]
            new = x.double().clone()
            for b in range(len(x)):
                new[b] -= (1 - float(r[b])) * z[b, :, int(latents[b])][:, None] * sae.W_dec[int(latents[b])].double()
            new = new.to(x.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    try:
        for key, latents, r in scales:
            handles.append(module_of(llama, key).register_forward_hook(subtract(flow[key], latents, r)))
        for key in read:
            handles.append(module_of(llama, key).register_forward_hook(
                lambda m, a, o, key=key: seen.__setitem__(key, first(o).detach())))
        with torch.no_grad():
            logits = llama.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen, (logits if full else None)


def cosine_top1(flow, target, cand):
    A, B = flow[target].W_dec.double(), flow[cand].W_dec.double()
    return ((A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T).argmax(1)


# ----------------------------------------------------------------------- events
def test_all_events_when_room_equal_a_brute_force_enumeration(flow_set, llama, contexts):
    all_events = sample_events(flow_set, llama, contexts, max_events=10_000, seed=0, skip_first=2)
    seen, _ = hand_forward(llama, flow_set, contexts, read=[(1, "res"), (2, "res")])
    want = set()
    for L in (1, 2):  # layer 0 has no predecessor SAE
        z = enc64(flow_set[(L, "res")], seen[(L, "res")])
        for c in range(N):
            for t in range(2, T):
                for f in range(z.shape[-1]):
                    if z[c, t, f] > 0:
                        want.add((c, t, L, f))
    got = set(zip(all_events.context.tolist(), all_events.position.tolist(), all_events.layer.tolist(),
                  all_events.feature.tolist()))
    assert got == want and all_events.population == len(want) == len(all_events)


def test_events_fire_and_their_predecessors_are_right(flow_set, llama, contexts, events):
    assert len(events) == 24 and events.population > 24
    keys = [(1, "res"), (2, "res"), (0, "res"), (1, "mlp"), (2, "mlp"), (1, "att"), (2, "att")]
    seen, _ = hand_forward(llama, flow_set, contexts, read=keys)
    z = {key: enc64(flow_set[key], seen[key]) for key in keys}
    groups = events.groups()
    n_random = 0
    for i in range(len(events)):
        c, t, L, f = (int(v[i]) for v in (events.context, events.position, events.layer, events.feature))
        assert t >= 1
        zf = z[(L, "res")][c, t, f]
        assert zf > 0 and math.isclose(float(events.z_old[i]), float(zf), abs_tol=1e-4)
        for s, slot in enumerate(SLOTS):
            key = slot_key(L, slot)
            p = int(cosine_top1(flow_set, (L, "res"), key)[f])
            assert int(events.top1[i, s]) == p
            assert bool(events.active[i, s]) == bool(z[key][c, t, p] > 0)
            q = int(events.random[i, s])
            firing = set((z[key][c, t] > 0).nonzero()[:, 0].tolist()) - {p}
            if q < 0:
                assert not firing
            else:
                n_random += 1
                assert q != p and q in firing
        names = [n for n, on in zip(("RES", "MLP", "ATT"), events.active[i].tolist()) if on]
        assert groups[i] == ("From " + " & ".join(names) if names else "From nowhere") and groups[i] in _GROUPS
    assert n_random > 0


def test_sampling_is_seeded_and_independent_of_batch_size(flow_set, llama, contexts, events):
    again = sample_events(flow_set, llama, contexts, max_events=24, seed=3, batch_size=1)
    for field in ("context", "position", "layer", "feature", "top1", "active", "random"):
        assert torch.equal(getattr(again, field), getattr(events, field)), field
    torch.testing.assert_close(again.z_old, events.z_old, atol=1e-5, rtol=0)
    other = sample_events(flow_set, llama, contexts, max_events=24, seed=4, batch_size=16)
    assert set(zip(other.context.tolist(), other.position.tolist(), other.feature.tolist(), other.layer.tolist())) != \
        set(zip(events.context.tolist(), events.position.tolist(), events.feature.tolist(), events.layer.tolist()))


# ----------------------------------------------------------------------- deactivation
@pytest.mark.parametrize("method,r", [("top1", 0.0), ("random", 0.0), ("top1", -0.5)])
def test_deactivation_equals_a_hand_hook(flow_set, llama, contexts, events, method, r):
    result = deactivate(flow_set, llama, contexts, events, r=r, method=method, batch_size=16)
    assert len(result.event) > 3
    latents = events.top1 if method == "top1" else events.random
    for m in range(0, len(result.event), max(1, len(result.event) // 5)):  # a handful of rows
        i, s = int(result.event[m]), int(result.slot[m])
        assert events.active[i, s] and int(result.latent[m]) == int(latents[i, s]) >= 0
        c, t, L, f = (int(v[i]) for v in (events.context, events.position, events.layer, events.feature))
        ids = contexts[c][None]
        target = flow_set[(L, "res")]
        seen, _ = hand_forward(llama, flow_set, ids, [(slot_key(L, SLOTS[s]), [latents[i, s]], [r])], [(L, "res")])
        z_new = enc64(target, seen[(L, "res")])[0, t, f]
        assert math.isclose(float(result.z_new[m]), float(z_new), abs_tol=1e-4)
        assert math.isclose(float(result.z_old[m]), float(events.z_old[i]), abs_tol=1e-4)
        assert bool(result.deactivated[m]) == (float(z_new) == 0)
        assert math.isclose(float(result.relative[m]), float(result.delta[m] / result.z_old[m]), rel_tol=1e-6)
    assert torch.equal(result.alone, events.active[result.event].sum(1) == 1)


def test_r_one_changes_nothing_and_batch_sizes_agree(flow_set, llama, contexts, events):
    same = deactivate(flow_set, llama, contexts, events, r=1.0, method="top1")
    assert len(same.event) and torch.equal(same.delta, torch.zeros_like(same.delta))
    a = deactivate(flow_set, llama, contexts, events, r=0.0, method="random", batch_size=1)
    b = deactivate(flow_set, llama, contexts, events, r=0.0, method="random", batch_size=16)
    assert torch.equal(a.event, b.event) and torch.equal(a.slot, b.slot)
    torch.testing.assert_close(a.z_new, b.z_new, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.z_old, b.z_old, atol=1e-5, rtol=0)


def test_summary_counts_match_the_rows(flow_set, llama, contexts, events):
    result = deactivate(flow_set, llama, contexts, events, r=0.0, method="top1")
    s = result.summary()
    assert s["count"] == int(events.active.sum()) == len(result.event)
    assert sum(g["count"] for g in s["groups"].values()) == s["count"]
    assert s["alone"]["count"] + s["with_others"]["count"] == s["count"]
    for name, g in s["groups"].items():
        rows = [m for m in range(len(result.event)) if result.groups[m] == name]
        want = sum(float(result.relative[m]) for m in rows) / len(rows)
        assert math.isclose(g["mean_relative"], want, rel_tol=1e-6, abs_tol=1e-9)
        assert g["fraction_deactivated"] == sum(float(result.z_new[m]) == 0 for m in rows) / len(rows)
    assert "From nowhere" not in s["groups"]  # nothing to deactivate there


# ----------------------------------------------------------------------- r sweep
def hand_loss(logits, ids):
    return F.cross_entropy(logits[0, :-1].double(), ids[0, 1:]).item()


def test_sweep_equals_hand_hooks_and_loss(flow_set, llama, contexts, events):
    few = events.take(events.active.any(1).nonzero()[:3, 0])
    rs = [0.0, 0.5, 1.0]
    sweep = r_sweep(flow_set, llama, contexts, few, rs, batch_size=2)
    assert sweep.event.tolist() == [0, 1, 2]
    for m in range(3):
        c, t, L, f = (int(v[m]) for v in (few.context, few.position, few.layer, few.feature))
        ids = contexts[c][None]
        seen, logits = hand_forward(llama, flow_set, ids, read=[(L, "res")], full=True)
        assert math.isclose(float(sweep.loss_old[m]), hand_loss(logits, ids), rel_tol=1e-5)
        for j, r in enumerate(rs):
            scales = [(slot_key(L, slot), [few.top1[m, s]], [r]) for s, slot in enumerate(SLOTS) if few.active[m, s]]
            seen, logits = hand_forward(llama, flow_set, ids, scales, [(L, "res")], full=True)
            z_new = float(enc64(flow_set[(L, "res")], seen[(L, "res")])[0, t, f])
            assert math.isclose(float(sweep.z_new[j, m]), z_new, abs_tol=1e-4)
            want = (hand_loss(logits, ids) - float(sweep.loss_old[m])) / float(sweep.loss_old[m])
            assert math.isclose(float(sweep.loss_relative[j, m]), want, abs_tol=1e-5)
    assert torch.equal(sweep.z_new[2], sweep.z_old) and torch.equal(sweep.loss_new[2], sweep.loss_old)
    points = sweep.summary()["points"]
    assert [p["r"] for p in points] == rs and points[2]["mean_relative"] == 0 and points[2]["mean_loss_relative"] == 0


def test_reports_plots_and_records(flow_set, llama, contexts, events, tmp_path):
    few = events.take(list(range(6)))
    results = [deactivate(flow_set, llama, contexts, few, method=m) for m in ("top1", "random")]
    sweep = r_sweep(flow_set, llama, contexts, few, [0.0, 1.0])
    text = format_deactivation(results, sweep, few)
    assert "method top1" in text and "method random" in text and "r sweep" in text
    json.dumps(record(few, results, sweep))
    assert plot_methods(results, tmp_path / "m.png").stat().st_size > 0
    assert plot_sweep(sweep, tmp_path / "s.png").stat().st_size > 0


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call", [
    lambda f, a, c, e: deactivate(f, a, c, e, r=float("nan")),
    lambda f, a, c, e: deactivate(f, a, c, e, r=float("inf")),
    lambda f, a, c, e: deactivate(f, a, c, e, method="bogus"),
    lambda f, a, c, e: deactivate(f, a, c, e, batch_size=0),
    lambda f, a, c, e: deactivate(f, a, c[:1], e),
    lambda f, a, c, e: r_sweep(f, a, c, e, [0.0, float("nan")]),
    lambda f, a, c, e: r_sweep(f, a, c, e, []),
    lambda f, a, c, e: sample_events(f, a, c, max_events=0),
    lambda f, a, c, e: sample_events(f, a, c, layers=[0]),
    lambda f, a, c, e: sample_events(f, a, c, layers=[5]),
    lambda f, a, c, e: sample_events(f, a, c, skip_first=T),
    lambda f, a, c, e: sample_events(f, a, c.float()),
    lambda f, a, c, e: sample_events(f, a, c + 1000),
])
def test_bad_input_is_refused(flow_set, llama, contexts, events, call):
    with pytest.raises(FeatoptError):
        call(flow_set, llama, contexts, events)
