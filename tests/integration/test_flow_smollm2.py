"""Feature flow on the real SmolLM2-135M: SAEs at the residual stream after blocks 2 and 3 and at
block 3's MLP and attention outputs, trained briefly from one pass of the real corpus; a
deactivation through featopt equals a plain HF forward with a hand-written hook, and steering with
r = 1 generates exactly what the unsteered model does."""

from __future__ import annotations

import pytest
import torch

from featopt.feature_flow.saes import FlowSet, Node
from featopt.commands.sae_train import TrainConfig, train
from tests.integration.conftest import MODELS

pytestmark = pytest.mark.slow
CORPUS = MODELS.parent / "data" / "corpora" / "state_union"
SITES = "blocks.2.resid_post,blocks.3.resid_post,blocks.3.mlp_out,blocks.3.attn_out"


@pytest.fixture(scope="module")
def flow(smollm, tmp_path_factory):
    if not CORPUS.is_dir():
        pytest.skip(f"the real corpus is not here: no {CORPUS}")
    # Adam with a short warm-up, as these few-step SAEs were designed (signum, now the default, is
    # tuned for runs of hundreds of steps)
    config = TrainConfig(model="smollm2-135m-instruct", site=SITES, corpus=str(CORPUS), architecture="topk",
                         expansion="1", k=16, tokens=16_384, context_length=64, batch_size=2048, buffer_batches=4,
                         optimizer="adam", warmup_steps=2, eval_contexts=8, out=str(tmp_path_factory.mktemp("flow")), progress=False)
    run = train(config, smollm)
    return FlowSet.load([str(p) for p in run.paths])


def _encode(sae, x):
    """The topk SAE written out in float64."""
    x = x.detach()
    pre = (x.double() - sae.b_dec.detach().double()) @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    kth = pre.topk(sae.cfg.k, dim=-1).values[..., -1:]
    return torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))


def test_deactivating_a_predecessor_equals_a_hand_hook(smollm, flow):
    from featopt.data import corpus_contexts
    from featopt.feature_flow.deactivate import deactivate
    from featopt.feature_flow.events import sample_events

    contexts = corpus_contexts(smollm.tokenizer, CORPUS, 32, split="eval")[:6]
    with torch.inference_mode():
        events = sample_events(flow, smollm, contexts, max_events=6, seed=0, batch_size=6)
        result = deactivate(flow, smollm, contexts, events, r=0.0, method="top1", batch_size=8)
    layers = smollm.model.model.layers
    modules = {"res": layers[2], "mlp": layers[3].mlp, "att": layers[3].self_attn}
    keys = {"res": (2, "res"), "mlp": (3, "mlp"), "att": (3, "att")}
    assert len(result.z_new) > 0  # some sampled event has an active top-1 predecessor
    for row in range(min(len(result.z_new), 6)):
        e, slot, latent = int(result.event[row]), result.slot[row], int(result.latent[row])
        slot = slot if isinstance(slot, str) else ("res", "mlp", "att")[int(slot)]
        sae = flow[keys[slot]]

        def hook(module, args, output, sae=sae, latent=latent):
            x = output[0] if isinstance(output, tuple) else output
            new = (x.double() - _encode(sae, x)[..., latent:latent + 1] * sae.W_dec.detach().double()[latent]).to(x.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        seen = {}
        handles = [modules[slot].register_forward_hook(hook),
                   layers[3].register_forward_hook(lambda m, a, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))]
        try:
            with torch.no_grad():
                smollm.model(input_ids=contexts[int(events.context[e])][None])
        finally:
            for h in handles:
                h.remove()
        want = _encode(flow[(3, "res")], seen["x"])[0, int(events.position[e]), int(events.feature[e])]
        assert abs(float(result.z_new[row]) - float(want)) < 1e-3 * max(1.0, abs(float(want)))


def test_steering_with_r_one_is_the_unsteered_generation(smollm, flow):
    from featopt.feature_flow.steer import Setting, steer

    nodes = [Node(3, "res", 5), Node(3, "mlp", 7), Node(2, "res", 11)]
    result = steer(flow, smollm, ["The president said"], [Setting("same", nodes, 1.0, "scale"),
                                                         Setting("more", nodes, 8.0, "scale")],
                   targets=nodes[:1], max_new_tokens=6, progress=False)
    assert result.outcomes[0].generations[0].ids == result.baseline.generations[0].ids
    assert len(result.baseline.generations[0].ids) == 6
