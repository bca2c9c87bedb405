"""Reading a model's parts: the width of every site and the block's output convention (a probe of
one token through block 0), and the MLP neurons' weight rows."""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.families import get_module
from featopt.models.sites import SITE_KINDS, Site


def probe(adapter) -> tuple[int | None, dict[str, int]]:
    """One token through block 0: `(the block's tuple length or None, {site kind: width})`."""
    block = adapter.blocks[0]
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            acts = adapter.run([Site(0, k) for k in SITE_KINDS], input_ids=torch.zeros(1, 1, dtype=torch.long))
    finally:
        handle.remove()
    out = seen["out"]
    tuple_len = len(out) if isinstance(out, (tuple, list)) else None
    return tuple_len, {site.kind: act.shape[-1] for site, act in acts.items()}


def mlp_weight(adapter, layer: int, path: str, what: str, neurons: int) -> Tensor:
    """`[neurons, d_model]`: the rows of the MLP projection at `path` of block `layer` (a view)."""
    from transformers.pytorch_utils import Conv1D

    adapter.site("mlp_hidden", layer)  # validates the layer
    module = get_module(adapter.blocks[layer], path)
    if module is None or not isinstance(getattr(module, "weight", None), Tensor):
        raise FeatoptError(f"model {adapter.name!r} has no {what} weight at {path} of block {layer}.")
    # Conv1D (GPT-2) stores [in, out]; nn.Linear stores [out, in]. Either way: a view, no copy.
    weight = module.weight.T if isinstance(module, Conv1D) else module.weight
    expected = (neurons, adapter.d_model)
    if tuple(weight.shape) != expected:
        raise FeatoptError(f"the {what} weight of block {layer} has shape {tuple(weight.shape)}, not "
                           f"[neurons, d_model] = {list(expected)}: this MLP layout is not supported.")
    return weight.detach()
