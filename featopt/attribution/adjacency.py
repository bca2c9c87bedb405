"""The attribution graph of a prompt: the direct effect of every source node on every target node of
the linearised replacement model (`replacement.py`), by batched backward passes.

Nodes, in circuit-tracer's order: the active features `(layer, position, latent)` (layers, then
positions, then latents ascending), the error nodes (`layer * T + position`), the token embeddings
(one per position), the logit nodes. `adjacency[target, source]` is the direct effect of the source
on the target along paths that cross no other node:

- a feature's target value is its pre-activation, `W_enc[:, latent] . mlp_in` at its layer and
  position; a logit's is its demeaned unembedding direction `W_U[t] - mean_v W_U[v]` read from the
  final norm's output at the last position (the logit less the mean logit);
- a feature source contributes `activation * d target / d activation`, an error node `error . d
  target / d error`, a token `embedding . d target / d embedding`: the linear model's Jacobian times
  the source's value, so the row of a target sums (with the constant terms: biases, and the MLP
  outputs at the model's `skip_first` positions) to its value.

A backward pass handles `batch_size` targets at once, one per copy of the prompt in the batch, from
one forward that every pass reuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt import memory
from featopt.errors import FeatoptError
from featopt.attribution.replacement import Prompt, ReplacementModel


@dataclass
class Graph:
    """An attribution graph (unpruned). `adjacency [N, N]`: rows are targets, columns sources."""

    input_ids: Tensor  # [T]
    features: Tensor  # [n_features, 3]: (layer, position, latent)
    activations: Tensor  # [n_features]
    logit_ids: Tensor  # [n_logits]
    logit_probs: Tensor  # [n_logits]: the model's probabilities of them at the last position
    adjacency: Tensor  # [N, N]
    n_layers: int
    check: float = 0.0  # the replacement's largest logit difference from the model's, relative (not saved)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    def node_ranges(self) -> dict[str, tuple[int, int]]:
        """`{"features" | "errors" | "tokens" | "logits": (start, end)}` of each kind of node."""
        f = len(self.features)
        e = f + self.n_layers * self.n_pos
        t = e + self.n_pos
        return {"features": (0, f), "errors": (f, e), "tokens": (e, t), "logits": (t, t + len(self.logit_ids))}


def logit_targets(prompt: Prompt, *, logit_ids: Tensor | None = None, max_logits: int = 10,
                  desired_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """`(ids, probabilities)` of the logit nodes: `logit_ids` if given, else the most probable next
    tokens until their probabilities sum to `desired_prob`, at most `max_logits` (circuit-tracer's rule)."""
    probs = torch.softmax(prompt.logits[-1], dim=-1)
    if logit_ids is not None:
        ids = torch.as_tensor(logit_ids, dtype=torch.long).reshape(-1)
        if len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= len(probs):
            raise FeatoptError(f"logit targets must be token ids in 0..{len(probs) - 1}, got {ids.tolist()}.")
        return ids, probs[ids]
    top = probs.topk(min(max_logits, len(probs)))
    keep = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_prob))) + 1
    return top.indices[:keep], top.values[:keep]


def attribute(model: ReplacementModel, input_ids: Tensor, *, logit_ids: Tensor | None = None, max_logits: int = 10,
              desired_prob: float = 0.95, batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> Graph:
    """The attribution graph of `input_ids [T]` (see the module docstring). The replacement model is
    checked to reproduce the model's logits first. `progress(done, total)` is called after each
    backward pass."""
    prompt = model.capture(input_ids)
    gap = model.check(prompt)
    n_layers, T = len(prompt.acts), len(prompt.input_ids)
    per_layer = [torch.nonzero(a) for a in prompt.acts]  # [n_l, 2]: (position, latent)
    features = torch.cat([torch.cat([torch.full((len(nz), 1), layer), nz], 1) for layer, nz in enumerate(per_layer)])
    activations = torch.cat([a[nz[:, 0], nz[:, 1]] for a, nz in zip(prompt.acts, per_layer)])
    ids, probs = logit_targets(prompt, logit_ids=logit_ids, max_logits=max_logits, desired_prob=desired_prob)
    n_f, n_l = len(features), len(ids)
    n_nodes = n_f + n_layers * T + T + n_l
    # The dense adjacency is the one allocation that grows with the square of the prompt's features;
    # a forward copy holds its sources and the activations backward needs (about a forward per layer).
    memory.check(4 * n_nodes * n_nodes, "cpu", flag="the prompt's length",
                 what=f"the attribution graph of {n_nodes:,} nodes ({n_f:,} active features)")
    adapter = model.adapter
    copy_bytes = 4 * T * sum(a.shape[-1] + 2 * e.shape[-1] for a, e in zip(prompt.acts, prompt.errors))
    copy_bytes += memory.forward_row_bytes(adapter.model.config, T) * n_layers
    batch_size = memory.fit_batch(batch_size, copy_bytes, adapter.device, flag="batch_size",
                                  fixed=4 * n_nodes * n_nodes, what="a copy of the prompt in the attribution's forward")
    adjacency = torch.zeros(n_nodes, n_nodes)

    W_U = adapter.lm_head.weight.detach().float()
    logit_dirs = W_U[ids] - W_U.mean(0)  # [n_l, d]
    targets = [("feature", i) for i in range(n_f)] + [("logit", j) for j in range(n_l)]
    rows_of = lambda kind, i: i if kind == "feature" else n_nodes - n_l + i  # noqa: E731

    batch = max(1, min(batch_size, len(targets)))
    run = model.linear(prompt, batch)
    sources = [run.embeds, *run.acts, *run.errors]
    for start in range(0, len(targets), batch):
        chunk = targets[start:start + batch]
        objective = _injection(model, run, features, logit_dirs, chunk)
        grads = torch.autograd.grad(objective, sources, retain_graph=start + batch < len(targets))
        g_embeds, g_acts, g_errors = grads[0], grads[1:1 + n_layers], grads[1 + n_layers:]
        rows = torch.zeros(batch, n_nodes)
        col = 0
        for layer, nz in enumerate(per_layer):  # features: activation times the gradient
            g = g_acts[layer][:, nz[:, 0], nz[:, 1]]  # [B, n_layer]
            rows[:, col:col + len(nz)] = g * activations[col:col + len(nz)]
            col += len(nz)
        for layer in range(n_layers):  # errors: error . gradient, per position
            rows[:, n_f + layer * T:n_f + (layer + 1) * T] = (g_errors[layer] * prompt.errors[layer]).sum(-1)
            rows[:, n_f + layer * T:n_f + layer * T + model.skip_first] = 0  # constants there, not nodes
        rows[:, n_f + n_layers * T:n_f + n_layers * T + T] = (g_embeds * prompt.embeds).sum(-1)
        for b, (kind, i) in enumerate(chunk):
            adjacency[rows_of(kind, i)] = rows[b]
        if progress is not None:
            progress(min(start + batch, len(targets)), len(targets))
    return Graph(prompt.input_ids.cpu(), features, activations.detach().cpu(), ids, probs.detach().cpu(), adjacency, n_layers,
                 gap)


def _injection(model: ReplacementModel, run, features: Tensor, logit_dirs: Tensor, chunk: list[tuple[str, int]]) -> Tensor:
    """The sum over the batch rows of each row's target value: row b carries target `chunk[b]`
    (rows past the chunk carry none)."""
    batch, T, d = run.embeds.shape
    inject = [torch.zeros(batch, T, d) for _ in run.mlp_in]
    final = torch.zeros(batch, d)
    for b, (kind, i) in enumerate(chunk):
        if kind == "feature":
            layer, pos, latent = (int(v) for v in features[i])
            inject[layer][b, pos] = model.transcoders[layer].W_enc[:, latent].detach().float()
        else:
            final[b] = logit_dirs[i]
    total = (run.final[:, -1].float() * final).sum()
    for x, v in zip(run.mlp_in, inject):
        total = total + (x.float() * v).sum()
    return total
