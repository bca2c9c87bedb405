"""Independent references for the search tests: activations read from the plain HF modules with
hooks set up here (Llama layout: `model.model.layers`), nothing from featopt."""

from __future__ import annotations


def resid_post(model, ids, layer):
    """The plain HF forward's block output after Llama block `layer`: `[batch, tokens, d_model]`.

    Read with a hook on the block, not from `hidden_states`: HF's last `hidden_states` entry is
    after the final norm, while `resid_post` is before it, also for the last block."""
    seen = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    out = seen["out"]
    return out[0] if isinstance(out, tuple) else out


def mlp_hidden(model, ids, layer):
    """The MLP neurons of Llama block `layer` (the down-projection's input): `[batch, tokens, d_mlp]`."""
    seen = {}
    down = model.model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["in"]


def feature_loss(adapter, plans, variant: str):
    """The swap searches' loss for maximizing each problem of `plans` (`[(site, problems)]`, problem
    ids through the plans in order) at the last position or summed over positions: what
    `featopt search gcg --variant VARIANT` scores, built the way the command builds it."""
    from featopt.discrete.objective_scoring import ObjectiveLoss
    from featopt.objectives import Selection, maximize, stack

    objective = stack([maximize(Selection(site, problems, over=variant)) for site, problems in plans]).bind(adapter)
    return ObjectiveLoss(objective, adapter)
