"""Transcoders in feature flow: a transcoder (reading block L's MLP input, writing its output) in the
`L/mlp` role. Checked against plain HF forward hooks and a float64 topk encoding of the MLP's own
input; the reference computations go through none of the adapter's hooks, `latent_edits` or `FlowSet.read_site`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from featopt.cli import main
from featopt.feature_flow.deactivate import deactivate
from featopt.feature_flow.events import sample_events
from featopt.feature_flow.groups import ROLES, predecessor_key
from featopt.feature_flow.saes import FlowSet
from featopt.feature_flow.steer_edits import steering_edits
from featopt.interventions.edits import edited, latent_edits
from featopt.models.sae.formats import save_sae
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from tests.feature_flow.flow_reference import D, D_SAE, K, KEYS, make_sae

N, T = 4, 10


def make_transcoder(layer: int, seed: int = 5) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture="topk", k=K, hook_name=f"blocks.{layer}.mlp_in",
                                      target_hook_name=f"blocks.{layer}.mlp_out", d_out=D))
    gen = torch.Generator().manual_seed(seed + layer)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(D))
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def flow():
    return FlowSet({key: make_transcoder(key[0]) if key[1] == "mlp" else make_sae(*key) for key in KEYS})


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (N, T), generator=torch.Generator().manual_seed(7))


def enc64(sae, x):
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    top = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))


def hand(llama, flow, ids, edit=None):
    """Plain HF hooks: `{"in": {L: MLP input}, "res": {L: block output}}`; `edit = (L, latent, r)`
    adds `(r - 1) z_latent(MLP input) W_dec[latent]` to block L's MLP output (z in float64)."""
    seen, handles = {"in": {}, "res": {}}, []
    for L, block in enumerate(llama.model.model.layers):
        handles.append(block.register_forward_hook(lambda m, a, o, L=L: seen["res"].__setitem__(L, o[0] if isinstance(o, tuple) else o)))

        def mlp_hook(module, args, output, L=L):
            seen["in"][L] = args[0].detach()
            if edit is None or edit[0] != L:
                return output
            sae = flow[(L, "mlp")]
            z = enc64(sae, args[0])[..., edit[1]]
            return (output.double() + (edit[2] - 1) * z[..., None] * sae.W_dec[edit[1]].double()).to(output.dtype)
        handles.append(block.mlp.register_forward_hook(mlp_hook))
    try:
        with torch.no_grad():
            logits = llama.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_a_transcoder_loads_in_the_mlp_role_and_matches_by_its_decoder(tmp_path, flow, capsys):
    folders = []
    for key in [(1, "res"), (2, "res"), (2, "mlp")]:
        folders.append(str(save_sae(flow[key], tmp_path / f"{key[0]}-{key[1]}")))
    loaded = FlowSet.load(",".join(folders))
    assert loaded.keys() == [(1, "res"), (2, "mlp"), (2, "res")]
    assert loaded.read_site((2, "mlp")).name == "blocks.2.mlp_in" and loaded.read_site((2, "res")).name == "blocks.2.resid_post"
    assert main(["flow", "match", "--saes", ",".join(folders), "--out", str(tmp_path / "m"), "--k", "1"]) == 0
    record = json.loads((tmp_path / "m" / "matches.json").read_text())
    assert {(p["target"], p["candidate"]) for p in record["pairs"]} == {("2/res", "1/res"), ("2/res", "2/mlp"), ("2/mlp", "1/res")}
    got = load_file(str(tmp_path / "m" / "matches.safetensors"))["2.res-2.mlp.indices"]
    A, B = flow[(2, "res")].W_dec.double(), flow[(2, "mlp")].W_dec.double()
    cos = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T
    assert torch.equal(got[:, 0], cos.argmax(1))


def test_events_read_the_transcoder_latents_from_the_mlp_input(flow, llama, contexts):
    events = sample_events(flow, llama, contexts, max_events=40, seed=1, batch_size=3)
    seen, _ = hand(llama, flow, contexts)
    s = ROLES.index("mlp")
    checked = 0
    for i in range(len(events)):
        c, t, L = int(events.context[i]), int(events.position[i]), int(events.layer[i])
        if predecessor_key(L, "mlp") not in flow:
            continue
        z = enc64(flow[(L, "mlp")], seen["in"][L])[c, t]
        assert bool(events.active[i, s]) == bool(z[int(events.top1[i, s])] > 0)
        checked += 1
    assert checked > 10 and events.active[:, s].any()


def test_deactivating_a_transcoder_latent_equals_the_hand_hook(flow, llama, contexts):
    events = sample_events(flow, llama, contexts, max_events=40, seed=1, batch_size=3)
    result = deactivate(flow, llama, contexts, events, r=0.0, method="top1", batch_size=8)
    rows = [m for m in range(len(result.event)) if ROLES[int(result.slot[m])] == "mlp"]
    assert rows
    for m in rows[:6]:
        i = int(result.event[m])
        c, t, L, f = (int(v[i]) for v in (events.context, events.position, events.layer, events.feature))
        seen, _ = hand(llama, flow, contexts[c][None], (L, int(result.latent[m]), 0.0))
        want = enc64(flow[(L, "res")], seen["res"][L])[0, t, f]
        assert math.isclose(float(result.z_new[m]), float(want), abs_tol=1e-4)
    assert any(float(result.delta[m]) != 0 for m in rows)  # the edit moved something: not vacuous


@pytest.mark.parametrize("r", [0.0, 3.0])
def test_latent_edits_and_steering_of_a_transcoder_equal_the_hand_hook(flow, llama, contexts, r):
    sae = flow[(1, "mlp")]
    seen, _ = hand(llama, flow, contexts)
    latent = int(enc64(sae, seen["in"][1]).sum((0, 1)).argmax())  # one that fires
    _, want = hand(llama, flow, contexts, (1, latent, r))
    with torch.no_grad(), edited(llama, latent_edits(sae, [latent], r)):
        got = llama.model(input_ids=contexts).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), edited(llama, steering_edits(flow, [f"1/mlp/{latent}"], r)):
        steered = llama.model(input_ids=contexts).logits
    torch.testing.assert_close(steered, want, rtol=1e-4, atol=1e-4)
    _, clean = hand(llama, flow, contexts)
    assert (want - clean).abs().max() > 1e-3  # the latent fires, so the edit changes the logits
