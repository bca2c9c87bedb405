"""Graph interventions against independent computations: the prediction against the linearised
network itself (features recomputed layer by layer from their inputs, no adjacency), the measured
changes against plain PyTorch forward hooks on the Hugging Face MLP modules."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.attribution.intervene import feature_nodes, intervention_record, measured, predicted, total_effects
from featopt.attribution.pruning import prune


def _linear_change(model, prompt, graph, nodes, factor):
    """The demeaned logit change in the frozen linear model when `nodes` are rescaled and every other
    active feature follows its pre-activation (inactive ones stay 0): layer by layer, from the
    linear forward's own MLP inputs."""
    active = [a > 0 for a in prompt.acts]
    chosen = {tuple(graph.features[i].tolist()) for i in nodes.tolist()}
    acts = [a[None].clone() for a in prompt.acts]
    sources = {"embeds": prompt.embeds[None].clone(), "acts": acts, "errors": [e[None].clone() for e in prompt.errors]}
    with torch.no_grad():
        for layer, tc in enumerate(model.transcoders):
            pre = model.linear(prompt, 1, sources).mlp_in[layer][0] @ tc.W_enc + tc.b_enc  # [T, d_sae]
            new = torch.where(active[layer], pre, torch.zeros_like(pre))
            for (lay, pos, latent) in chosen:
                if lay == layer:
                    new[pos, latent] = factor * pre[pos, latent]
            acts[layer] = new[None]
        final = model.linear(prompt, 1, sources).final[0, -1]
    W_U = model.adapter.lm_head.weight.detach()
    dirs = W_U[graph.logit_ids] - W_U.mean(0)
    return final @ dirs.T


def _base_linear(model, prompt, graph):
    with torch.no_grad():
        final = model.linear(prompt, 1).final[0, -1]
    W_U = model.adapter.lm_head.weight.detach()
    return final @ (W_U[graph.logit_ids] - W_U.mean(0)).T


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_the_prediction_is_the_linear_network_with_the_features_rescaled(setup, graph, factor):
    _, model, _, prompt = setup
    layers = graph.features[:, 0]
    nodes = torch.cat([torch.nonzero(layers == 0).flatten()[:3], torch.nonzero(layers == 1).flatten()[:2]])
    expected = _linear_change(model, prompt, graph, nodes, factor) - _base_linear(model, prompt, graph)
    got = predicted(graph, nodes, factor)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert float(expected.abs().max()) > 1e-3 or factor == 1.0  # the check would see a wrong answer


def test_total_effects_are_the_changes_removing_each_feature_alone_predicts(graph):
    effects = total_effects(graph, logit=0)
    for i in [0, len(graph.features) // 2, len(graph.features) - 1]:
        torch.testing.assert_close(effects[i], -predicted(graph, torch.tensor([i]), 0.0)[0], rtol=1e-4, atol=1e-6)


def _hf_change(model, prompt, graph, node, factor, frozen_errors):
    """The demeaned logit change with plain forward hooks on the Hugging Face MLP modules: the
    feature's decoder contribution rescaled at its position; with `frozen_errors`, every MLP output
    replaced by its transcoder plus the prompt's error."""
    layer, pos, latent = graph.features[node].tolist()
    handles = []

    def hook(L):
        tc = model.transcoders[L]

        def fn(module, args, output):
            x = args[0]
            out = tc.decode(tc.encode(x)) + tc.skip_out(x) + prompt.errors[L] if frozen_errors else output
            if L == layer:
                z = tc.encode(x)[0, pos, latent]
                out = out.clone()
                out[0, pos] += (factor - 1) * z * tc.W_dec[latent]
            return out
        return fn

    blocks = model.adapter.model.model.layers
    for L in range(len(blocks)):
        if frozen_errors or L == layer:
            handles.append(blocks[L].mlp.register_forward_hook(hook(L)))
    try:
        with torch.no_grad():
            logits = model.adapter.model(input_ids=prompt.input_ids[None]).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    ids = graph.logit_ids
    base = prompt.logits[-1]
    return (logits[ids] - logits.mean()) - (base[ids] - base.mean())


@pytest.mark.parametrize("frozen_errors", [True, False])
def test_the_measured_changes_are_the_model_with_its_mlps_hooked_by_hand(setup, graph, frozen_errors):
    _, model, _, prompt = setup
    node = int(torch.nonzero(graph.features[:, 0] == 0).flatten()[0])
    got = measured(model, prompt, graph, torch.tensor([node]), 0.0, frozen_errors=frozen_errors)
    expected = _hf_change(model, prompt, graph, node, 0.0, frozen_errors)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert float(expected.abs().max()) > 1e-4
    unchanged = measured(model, prompt, graph, torch.tensor([node]), 1.0, frozen_errors=frozen_errors)
    assert float(unchanged.abs().max()) < 1e-4


def test_the_record_sets_prediction_beside_measurement(setup, graph):
    _, model, _, prompt = setup
    nodes = total_effects(graph).abs().topk(2).indices
    record = intervention_record(model, prompt, graph, nodes, 0.0, prune(graph), lambda t: f"<{t}>")
    assert [f["node_id"] for f in record["features"]] == [
        f"{layer}_{latent}_{pos}" for layer, pos, latent in graph.features[nodes].tolist()]
    row = record["logits"][0]
    assert row["id"] == int(graph.logit_ids[0]) and row["token"] == f"<{row['id']}>"
    assert row["predicted"] == pytest.approx(float(predicted(graph, nodes, 0.0)[0]), rel=1e-6)
    same = (row["unfrozen"] > 0) == (row["predicted"] > 0)
    assert record["agreement"]["unfrozen"]["same_sign"] == (same and row["unfrozen"] != 0)


def test_feature_ids_are_graph_node_ids_of_active_features(graph):
    layer, pos, latent = graph.features[3].tolist()
    assert feature_nodes(graph, f"{layer}_{latent}_{pos}").tolist() == [3]
    with pytest.raises(FeatoptError, match="is not a node id"):
        feature_nodes(graph, "3-4")
    inactive = next(i for i in range(100) if (0, 0, i) not in {tuple(f) for f in graph.features.tolist()})
    with pytest.raises(FeatoptError, match="is not active in this graph"):
        feature_nodes(graph, f"0_{inactive}_0")
    with pytest.raises(FeatoptError, match="no features given"):
        feature_nodes(graph, " , ")


def test_with_attention_and_errors_frozen_only_switching_features_part_measurement_from_prediction(setup, graph):
    _, model, _, prompt = setup
    at_end = (graph.features[:, 0] == model.adapter.n_layers - 1) & (graph.features[:, 1] == graph.n_pos - 1)
    last = torch.nonzero(at_end).flatten()[:2]  # at the last position: the others cannot reach its logits
    # A last-layer feature reaches the logits only through the frozen final norm: exactly linear.
    got = measured(model, prompt, graph, last, 0.0, frozen_errors=True, frozen_attention=True)
    torch.testing.assert_close(got, predicted(graph, last, 0.0), rtol=1e-4, atol=1e-5)
    assert float(got.abs().max()) > 1e-3
    free = measured(model, prompt, graph, last, 0.0, frozen_errors=True)
    assert float((free - got).abs().max()) > 1e-4  # the free final norm is not linear
    # An early feature nudged: to first order, nothing switches.
    first = torch.nonzero(graph.features[:, 0] == 0).flatten()[:1]
    small = measured(model, prompt, graph, first, 0.99, frozen_errors=True, frozen_attention=True)
    torch.testing.assert_close(small, predicted(graph, first, 0.99), rtol=1e-2, atol=1e-3 * float(small.abs().max()))
