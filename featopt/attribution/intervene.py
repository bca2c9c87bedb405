"""Interventions that test an attribution graph: scale (or zero) a set of its features at their
positions, and set the change the graph predicts in each logit beside the change measured.

Every logit change is of the graph's logit nodes' value, the *demeaned* logit at the last position
(`logit_t - mean_v logit_v`), so prediction and measurement are of the same quantity.

- **Predicted** (:func:`predicted`): linear in the replacement model. Writing `J[t, s] = A[t, s] /
  x_s` for the Jacobian of the frozen linear model (`A` the adjacency, `x_s` a feature's
  activation), a change `d_s = rho_s x_s` of the features moves a target by `sum_s A[t, s] rho_s`.
  Active features stay active and pass their pre-activation's change on (an active JumpReLU or
  top-k latent *is* its pre-activation); the intervened ones are rescaled as the edit does,
  `a -> r * a(x)`, so `rho = (r - 1) + r * (their upstream change)`. Layers are solved in order
  (a feature reads only earlier layers), so `n_layers` rounds are exact. With `pruned`, only the
  kept nodes and edges carry the change: what the pruned graph, as a reader sees it, predicts.
- **Measured, errors frozen** (:func:`measured`, `frozen_errors=True`): the real model (attention
  and norms free) with every MLP replaced by its transcoder plus the error the prompt's own forward
  left (`decode(encode(x)) + skip(x) + e`), every feature recomputed from its input except the
  intervened ones, rescaled: Circuit Tracing's test of the replacement model itself.
- **Measured, errors and attention frozen** (`frozen_attention=True`): the same, with the attention
  patterns and norm scales also held at the prompt's (circuit-tracer's default for interventions):
  only features switching on or off in later layers separate it from the prediction.
- **Measured, errors unfrozen** (`frozen_errors=False`): the real model, its MLPs untouched, with
  the intervened features' decoder contributions rescaled at their positions (the edits of
  :func:`featopt.interventions.edits.latent_edits`): what the model itself does.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.attribution.adjacency import Graph
from featopt.attribution.pruning import Pruned
from featopt.attribution.replacement import Prompt, ReplacementModel
from featopt.interventions.edits import Edit, edited, latent_edits
from featopt.models.linearize import frozen


def feature_nodes(graph: Graph, spec: str) -> Tensor:
    """The feature node indices of `spec`: comma-separated node ids `layer_latent_position` as
    graph.json names them (`"12_345_5,14_7_5"`); each must be an active feature of the graph."""
    index = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    nodes = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            layer, latent, pos = (int(v) for v in part.split("_"))
        except ValueError:
            raise FeatoptError(f"feature {part!r} is not a node id: give layer_latent_position, as graph.json names "
                               "feature nodes (e.g. 12_345_5).") from None
        if (layer, pos, latent) not in index:
            raise FeatoptError(f"feature {part!r} (layer {layer}, latent {latent}, position {pos}) is not active in this "
                               "graph: give the node id of one of its features (graph.json, or `featopt graph view`).")
        nodes.append(index[(layer, pos, latent)])
    if not nodes:
        raise FeatoptError("no features given: name them by node id (layer_latent_position), or give --top N.")
    return torch.tensor(sorted(set(nodes)))


def _jacobian_parts(graph: Graph, pruned: Pruned | None) -> tuple[Tensor, Tensor]:
    """`(A_FF [n_f, n_f], A_LF [n_logits, n_f])`: feature-to-feature and feature-to-logit direct
    effects, limited to the pruned graph's kept nodes and edges when given."""
    n_f = len(graph.features)
    A = graph.adjacency
    if pruned is not None:
        A = A * (pruned.edges & pruned.nodes[:, None] & pruned.nodes[None, :])
    start = graph.node_ranges()["logits"][0]
    return A[:n_f, :n_f], A[start:, :n_f]


def total_effects(graph: Graph, logit: int = 0) -> Tensor:
    """`[n_features]`: each feature's total effect on logit node `logit` in the linear replacement
    model (the logit change its removal would cause, negated): direct plus through later features."""
    A_FF, A_LF = _jacobian_parts(graph, None)
    x = graph.activations
    # g[s] = d logit / d (relative change of s); back-propagated one layer per round.
    g = A_LF[logit].clone()
    for _ in range(graph.n_layers):
        g = A_LF[logit] + (g / x) @ A_FF
    return g


def predicted(graph: Graph, nodes: Tensor, factor: float, pruned: Pruned | None = None) -> Tensor:
    """`[n_logits]`: the change in each logit node when the features `nodes` are rescaled by
    `factor`, linear in the replacement model (see the module docstring)."""
    A_FF, A_LF = _jacobian_parts(graph, pruned)
    x = graph.activations
    chosen = torch.zeros(len(x), dtype=torch.bool)
    chosen[nodes] = True
    if pruned is not None:
        chosen &= pruned.nodes[:len(x)]  # a pruned-away feature is not in the graph a reader sees
    rho = torch.zeros(len(x))
    for _ in range(graph.n_layers + 1):
        upstream = (A_FF @ rho) / x
        rho = torch.where(chosen, (factor - 1) + factor * upstream, upstream)
    return A_LF @ rho


def _demeaned(logits: Tensor, ids: Tensor) -> Tensor:
    return logits[ids] - logits.mean()


def measured(model: ReplacementModel, prompt: Prompt, graph: Graph, nodes: Tensor, factor: float, *,
             frozen_errors: bool, frozen_attention: bool = False) -> Tensor:
    """`[n_logits]`: the change in each logit node of `graph` when its features `nodes` are
    rescaled by `factor` in the real model, its MLPs' errors frozen or not (module docstring);
    `frozen_attention` also holds the attention patterns and norm scales at the prompt's (what
    circuit-tracer's `feature_intervention` does by default), so only the transcoders' own
    nonlinearity (features switching on or off) separates it from the prediction."""
    adapter = model.adapter
    T = len(prompt.input_ids)
    edits: list[Edit] = []
    if frozen_errors:
        edits += _frozen_replacement(model, prompt)
    for i in nodes.tolist():
        layer, pos, latent = graph.features[i].tolist()
        positions = torch.zeros(T, dtype=torch.bool)
        positions[pos] = True
        edits += latent_edits(model.transcoders[layer], [latent], factor, positions=positions, label="graph intervention")
    held = frozen(adapter, prompt.frozen) if frozen_attention else contextlib.nullcontext()
    with torch.no_grad(), held, edited(adapter, edits):
        logits = adapter.model(input_ids=prompt.input_ids[None].to(adapter.device)).logits[0, -1].float()
    base = prompt.logits[-1].float()
    ids = graph.logit_ids.to(base.device)
    return (_demeaned(logits, ids) - _demeaned(base, ids)).cpu()


def _frozen_replacement(model: ReplacementModel, prompt: Prompt) -> list[Edit]:
    """Edits making every MLP its transcoder plus the prompt's frozen error term."""
    edits = []
    for layer, tc in enumerate(model.transcoders):
        seen: dict[str, Tensor] = {}

        def record(act: Tensor, _site, seen=seen) -> Tensor:
            seen["x"] = act
            return act

        def replace(act: Tensor, _site, tc=tc, seen=seen, error=prompt.errors[layer]) -> Tensor:
            x = seen["x"].to(error.dtype)
            z = tc.encode(x)
            z[:, :model.skip_first] = 0  # as captured: the error there holds the whole MLP output
            return (tc.decode(z) + tc.skip_out(x) + error[None, :x.shape[1]]).to(act.dtype)

        edits += [Edit(model.mlp_in[layer], record, "frozen error"), Edit(model.mlp_out[layer], replace, "frozen error")]
    return edits


def intervention_record(model: ReplacementModel, prompt: Prompt, graph: Graph, nodes: Tensor, factor: float,
                        pruned: Pruned | None, decode) -> dict:
    """Everything `featopt graph intervene` reports: the features, and per logit node its
    probability, demeaned logit, the predicted changes (whole linear graph, pruned graph) and the
    measured ones (errors and attention frozen, errors frozen, unfrozen), and the agreement of
    prediction and measurement."""
    whole = predicted(graph, nodes, factor)
    kept = predicted(graph, nodes, factor, pruned) if pruned is not None else None
    held = measured(model, prompt, graph, nodes, factor, frozen_errors=True, frozen_attention=True)
    fixed = measured(model, prompt, graph, nodes, factor, frozen_errors=True)
    real = measured(model, prompt, graph, nodes, factor, frozen_errors=False)
    base = prompt.logits[-1].float().cpu()
    rows = []
    for j, token in enumerate(graph.logit_ids.tolist()):
        rows.append({"token": decode(token), "id": token, "probability": float(graph.logit_probs[j]),
                     "logit": float(_demeaned(base, graph.logit_ids[j:j + 1])[0]), "predicted": float(whole[j]),
                     "predicted_pruned": None if kept is None else float(kept[j]),
                     "frozen_attention": float(held[j]), "frozen_errors": float(fixed[j]), "unfrozen": float(real[j])})
    features = []
    for i in nodes.tolist():
        layer, pos, latent = graph.features[i].tolist()
        features.append({"node_id": f"{layer}_{latent}_{pos}", "layer": layer, "position": pos, "latent": latent,
                         "activation": float(graph.activations[i])})
    return {"factor": factor, "features": features, "logits": rows, "agreement": agreement(rows[0])}


def agreement(row: dict) -> dict:
    """For one logit: whether each measured change has the predicted sign, and the prediction's error
    relative to the measured change."""
    out = {}
    for key in ("frozen_attention", "frozen_errors", "unfrozen"):
        actual, pred = row[key], row["predicted"]
        out[key] = {"same_sign": (actual > 0) == (pred > 0) and actual != 0,
                    "relative_error": abs(pred - actual) / abs(actual) if actual else None}
    return out
