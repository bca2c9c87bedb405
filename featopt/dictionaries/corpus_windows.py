"""What the corpus says about a feature, as a yardstick for searched inputs: its maximum, and the
windows of N tokens that end at its top examples, with the model's own cross-entropy of each.

A searched input is N tokens after a fixed prefix (the end-of-text separator, or the BOS token of
`--bos`), with the feature read at its last token. A window is cut from a top example the same
way, the N corpus tokens ending at the example, and scored the same way: after the same prefix,
the model's mean next-token cross-entropy of its N tokens (:func:`featopt.discrete.candidates.
prompt_xent`). An input is *fluent* for a feature when its cross-entropy is at most the median
over that feature's windows: as readable, to the model, as the typical text the feature fires on.

Windows come from a `featopt sae features` folder (:func:`from_stats`: the windows it keeps around
every top example) or from one pass over corpus contexts for any objective's features
(:func:`from_corpus`: SAE latents, neurons, directions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.discrete.candidates import prompt_xent
from featopt.discrete.measure import remeasure
from featopt.dictionaries.feature_stats import FeatureStats
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.objectives import Objective
from featopt.objectives.problems import parts, primary


@dataclass
class CorpusWindows:
    """Per problem p: `maximum[p]` (its corpus max, every kept position), `windows[p] [k_p, N]`
    (token ids, strongest example first) and `activations[p] [k_p]` (each example's activation
    in its full corpus context). A problem may have no window (it never fires, or every top
    example sits closer than N tokens to its context's start)."""

    maximum: Tensor  # [P] float64
    windows: list[Tensor]
    activations: list[Tensor]

    def __len__(self) -> int:
        return len(self.windows)

    def top(self, k: int) -> CorpusWindows:
        """Only each problem's `k` strongest windows."""
        return CorpusWindows(self.maximum, [w[:k] for w in self.windows], [a[:k] for a in self.activations])


def check_window_length(n_tokens: int, before: int, flag: str = "--tokens") -> None:
    if n_tokens > before + 1:
        raise FeatoptError(f"{flag} {n_tokens} needs windows of {n_tokens} corpus tokens, but the statistics keep "
                           f"{before} tokens before each example: give {flag} {before + 1} or fewer, or recompute "
                           f"them with --window_before {n_tokens - 1} or more.")


def from_stats(stats: FeatureStats, latents: list[int], n_tokens: int, *, bos: bool = False,
               flag: str = "--tokens") -> CorpusWindows:
    """The windows of `n_tokens` tokens ending at each top example `featopt sae features` kept for
    each latent of `latents`; an example nearer than that to its context's start (or, with
    `bos`, to the BOS token at its column 0) gives no window."""
    before = stats.window[0]
    check_window_length(n_tokens, before, flag)
    bad = [i for i in latents if not 0 <= i < stats.d_sae]
    if bad:
        raise FeatoptError(f"latent {bad[0]} is out of range: the statistics cover latents 0-{stats.d_sae - 1}.")
    windows, values = [], []
    for i in latents:
        index = stats.top_index[i]
        cut = stats.top_tokens[i, :, before - n_tokens + 1: before + 1].long()  # [k, N]
        position = index % stats.context_length
        keep = (index >= 0) & (cut >= 0).all(1) & (position - n_tokens + 1 >= int(bos))
        windows.append(cut[keep])
        values.append(stats.top_values[i][keep].double())
    return CorpusWindows(stats.max[latents].double(), windows, values)


def _per_position(objective: Objective, acts: dict) -> Tensor:
    """Every problem's activation at every position `[B, T, P]` (each part's own selection)."""
    out = []
    for part in parts(objective):
        sel = primary(part)
        if sel is None:
            raise FeatoptError(f"{part.description} reads no features at a site, so the corpus has no examples of it: "
                               "give an objective of features (an SAE's latents, neurons, directions).")
        x = sel.read(acts[sel.site])
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 kept: a bf16 mean is too coarse
        out.append(x @ sel.feature_weights(x.shape[-1], x.device, x.dtype).T)
    return torch.cat(out, dim=-1)


@torch.inference_mode()
def from_corpus(adapter: ModelAdapter, objective: Objective, contexts: Tensor, n_tokens: int, *, top_k: int = 20,
                skip_first: int = 1, batch_contexts: int = 8, progress: bool = True) -> CorpusWindows:
    """One pass over `contexts [C, L]`: every problem's max over all positions from `skip_first`
    on, and the windows of `n_tokens` tokens ending at its `top_k` strongest positions among those
    far enough from the context's start (position `n_tokens - 1`, plus one with `--bos`)."""
    from tqdm.auto import tqdm

    P, L = objective.n_problems, contexts.shape[1]
    first = max(skip_first, n_tokens - 1 + int(adapter.bos))
    maximum = torch.full((P,), float("-inf"), dtype=torch.float64)
    best = torch.full((P, 0), float("-inf"), dtype=torch.float64)
    where = torch.zeros(P, 0, dtype=torch.long)
    for start in tqdm(range(0, len(contexts), batch_contexts), desc="corpus windows", disable=not progress, leave=False):
        ids = contexts[start:start + batch_contexts].to(adapter.device)
        values = _per_position(objective, adapter.run(objective.sites, input_ids=ids)).double().cpu()  # [B, L, P]
        maximum = torch.maximum(maximum, values[:, skip_first:].amax((0, 1)))
        flat = values[:, first:].permute(2, 0, 1).reshape(P, -1)  # [P, B * (L - first)]
        b = torch.arange(len(ids))[:, None] + start
        global_index = (b * L + torch.arange(first, L)[None]).reshape(-1)
        best = torch.cat([best, flat], dim=1)
        where = torch.cat([where, global_index.expand(P, -1)], dim=1)
        order = best.topk(min(top_k, best.shape[1]), dim=1).indices
        best, where = best.gather(1, order), where.gather(1, order)
    windows, acts = [], []
    for p in range(P):
        fired = best[p] > 0  # a window of a feature that never fires is no yardstick
        c, q = where[p][fired] // L, where[p][fired] % L
        windows.append(torch.stack([contexts[ci, qi - n_tokens + 1: qi + 1] for ci, qi in zip(c.tolist(), q.tolist())])
                       if len(c) else torch.zeros(0, n_tokens, dtype=torch.long))
        acts.append(best[p][fired])
    return CorpusWindows(maximum, windows, acts)


@dataclass
class Fluency:
    """Per problem: each window's cross-entropy `xent[p] [k_p]` and activation as an input
    `standalone[p] [k_p]` (after the prefix, the feature at its last token), and `threshold[p]`,
    the median of `xent[p]` (torch's median: the lower of the two middle values; NaN without
    windows, when no input counts as fluent)."""

    xent: list[Tensor]
    standalone: list[Tensor]
    threshold: Tensor  # [P] float64


def fluency(adapter: ModelAdapter, measure: Objective, windows: CorpusWindows, prefix: Tensor) -> Fluency:
    """Score every window as an input after `prefix [L]`: cross-entropy and the measured feature."""
    rows = [(p, w) for p in range(len(windows)) for w in windows.windows[p]]
    if rows:
        ids = torch.stack([torch.cat([prefix.cpu(), w]) for _, w in rows])
        problems = torch.tensor([p for p, _ in rows])
        xent = prompt_xent(adapter, ids, len(prefix))
        measured = remeasure(adapter, measure, ids, problems).activation
    counts = [len(w) for w in windows.windows]
    xents = list(torch.split(xent, counts)) if rows else [torch.zeros(0, dtype=torch.float64) for _ in counts]
    alone = list(torch.split(measured, counts)) if rows else [torch.zeros(0, dtype=torch.float64) for _ in counts]
    threshold = torch.tensor([float(x.median()) if len(x) else float("nan") for x in xents], dtype=torch.float64)
    return Fluency(xents, alone, threshold)
