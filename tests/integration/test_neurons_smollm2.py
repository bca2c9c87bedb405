"""Neuron decoding and clamping on the real SmolLM2-135M (few, fast checks; the rest run on tiny
models): decoded top tokens against a full softmax from the plain HF modules, and clamping a neuron
at its own natural value leaving the logits unchanged."""

from __future__ import annotations

import pytest
import torch

from featopt.interventions import clamp, clamp_sweep
from featopt.weights.decode import Unembed, decode_directions
from featopt.weights.neurons import neuron_weights

pytestmark = pytest.mark.slow

NEURONS = [0, 7, 333, 1024, 1535]


@pytest.mark.parametrize("layer", [3, 20])
def test_decoded_neurons_equal_the_full_softmax(smollm, layer):
    model = smollm.model
    rows = model.model.layers[layer].mlp.up_proj.weight[NEURONS]  # the HF module's own rows
    assert torch.equal(neuron_weights(smollm, layer)[NEURONS], rows)
    for norm, h in (("none", rows), ("apply", model.model.norm(rows))):  # the paper's choice, and the final norm
        got = decode_directions(rows, Unembed.from_adapter(smollm, norm), k=10)
        with torch.no_grad():
            probs = torch.softmax(model.lm_head(h).double(), -1)
        top = probs.topk(100, -1)
        assert torch.equal(got.ids[:, 0], top.indices[:, 0]), norm
        # Tie-proof: the decoded ids carry exactly the reference's ten best probabilities, in order
        # (float32 matmuls in other chunks may swap two tokens whose logits agree to ~1e-7).
        torch.testing.assert_close(probs.gather(1, got.ids), top.values[:, :10], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.probs.double(), top.values[:, :10], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.top_mean.double(), top.values.mean(1), rtol=1e-4, atol=1e-9)


def test_clamping_at_the_natural_values_changes_nothing_and_the_sweep_is_a_plain_forward(smollm):
    model, ids = smollm.model, smollm.encode("My favourite animal is")[None]
    site = smollm.site("mlp_hidden", 20)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        natural = smollm.run([site], input_ids=ids)[site][..., 633]  # [1, T]: each position its own value
        with clamp(smollm, 20, 633, natural):
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    target = smollm.encode(" dog").tolist()
    got = clamp_sweep(smollm, 20, 633, ids[0], target, torch.tensor([-30.0, 30.0]))

    def hook(module, args):  # written here: the down-projection's input is the neurons' output
        x = args[0].clone()
        x[..., 633] = value
        return (x,) + args[1:]

    for value, p in zip((-30.0, 30.0), got.tolist()):
        handle = model.model.layers[20].mlp.down_proj.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                expected = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)[target[0]]
        finally:
            handle.remove()
        assert p == pytest.approx(float(expected), rel=1e-4)
