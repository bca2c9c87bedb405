"""Steering edits (document 003, §5.3): what a steering setting does to the SAE sites it touches.

Mode `"scale"` multiplies each chosen feature's contribution by `r` (`r = 0` deactivates it, `r = 1`
changes nothing, bit for bit); mode `"add"` adds `r * reference[node] * W_dec[i]` at every
position, the reference a typical activation of the feature (its max over some text,
:func:`reference_activations`). One :class:`~featopt.interventions.edits.Edit` per SAE; the
edits of several sites compose in one forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet, Node
from featopt.interventions.edits import Edit, add_direction, latent_edits
from featopt.models import ModelAdapter

MODES = ("scale", "add")


def checked_nodes(flow: FlowSet, nodes, what: str = "steering") -> list[Node]:
    """`nodes` as :class:`Node` of SAEs in `flow`, each once, in order; one sentence for none."""
    nodes = [flow.check_node(n) for n in nodes]
    if not nodes:
        raise FeatoptError(f"no feature given for {what}: give one or more features like 6/res/123.")
    return list(dict.fromkeys(nodes))  # a feature given twice is steered once


def by_sae(nodes: Sequence[Node]) -> dict[tuple[int, str], list[Node]]:
    """`nodes` grouped by their SAE's key, in order."""
    groups: dict[tuple[int, str], list[Node]] = {}
    for node in nodes:
        groups.setdefault(node.key, []).append(node)
    return groups


def steering_edits(flow: FlowSet, nodes: Sequence[Node | str], r: float, *, mode: str = "scale",
                   reference: dict[Node, float] | None = None) -> list[Edit]:
    """One :class:`Edit` per SAE holding some of `nodes`: `"scale"` rescales the latents'
    contributions by `r`; `"add"` adds `r * sum_i reference[node_i] * W_dec[i]` at every position."""
    if mode not in MODES:
        raise FeatoptError(f"unknown steering mode {mode!r}: allowed are {', '.join(MODES)}.")
    if not math.isfinite(float(r)):
        raise FeatoptError(f"the steering coefficient r must be a finite number, got {r}.")
    edits = []
    for key, group in by_sae(checked_nodes(flow, nodes)).items():
        sae, label = flow[key], f"{mode} r={r:g} " + ",".join(map(str, group))
        index = [n.index for n in group]
        if mode == "scale":
            edits += latent_edits(sae, index, float(r), label=label)
            continue
        missing = [str(n) for n in group if reference is None or n not in reference]
        if missing:
            raise FeatoptError(f"add-mode steering needs a reference activation of {', '.join(missing)}: "
                               "pass reference=reference_activations(...).")
        coef = torch.tensor([float(reference[n]) for n in group], dtype=sae.W_dec.dtype)
        edits.append(Edit(group[0].site, add_direction(coef @ sae.W_dec.detach()[index], float(r)), label))
    return edits


@torch.no_grad()
def reference_activations(flow: FlowSet, adapter: ModelAdapter, nodes: Sequence[Node | str], contexts: Tensor,
                          *, batch_size: int = 16) -> dict[Node, float]:
    """Each node's max activation over `contexts [N, T]` (token ids; position 0, often BOS, is
    skipped); 1.0, with a warning, for a feature that never fires there."""
    nodes = checked_nodes(flow, nodes, "reference activations")
    flow.check_model(adapter)
    if contexts.ndim != 2 or contexts.shape[0] < 1 or contexts.shape[1] < 2:
        raise FeatoptError(f"contexts must be token ids [N, T] with N >= 1 and T >= 2, got {list(contexts.shape)}.")
    groups = by_sae(nodes)
    best = {n: 0.0 for n in nodes}
    for start in range(0, len(contexts), batch_size):
        acts = adapter.run([flow.read_site(key) for key in groups], input_ids=contexts[start:start + batch_size])
        for key, group in groups.items():
            z = flow[key].encode(acts[flow.read_site(key)][:, 1:])  # [B, T-1, d_sae]
            for node in group:
                best[node] = max(best[node], float(z[..., node.index].max()))
    silent = [str(n) for n, v in best.items() if v <= 0]
    if silent:
        warnings.warn(f"features {', '.join(silent)} never fire on the {len(contexts)} contexts: their reference "
                      "activation is set to 1.0.")
    return {n: (v if v > 0 else 1.0) for n, v in best.items()}
