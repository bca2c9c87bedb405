"""EPO-style fluent search (Thompson et al. 2024, "Fluent dreaming for language models"): inputs
that make a feature fire AND read like text. A population per problem, one member per fluency
weight lambda; member m minimizes `loss + lambda_m * xent`, with xent the model's own mean
next-token cross-entropy of the prompt and `loss` any objective's (minus a feature's activation
for maximize). Each step every member proposes GCG swaps from its own token gradients, all of a
problem's candidates are scored once (objective and xent, one forward to the LM head), and each
member takes the best of the shared pool under its own lambda. Every scored sequence feeds the
problem's Pareto front (score up, xent down), written as JSON and a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from featopt.discrete.candidates import CandidateModel, prompt_xent
from featopt.discrete.measure import remeasure
from featopt.discrete.objective_scoring import ObjectiveLoss, check_discrete
from featopt.discrete.swap_search import SwapSettings, SwapState, swap_search
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.objectives import Objective
from featopt.objectives.problems import descriptions, feature_maps, labels
from featopt.results import FeatureResult, atomic_write, versions


class Front:
    """The non-dominated `(activation, xent)` points of one problem with their token ids: no kept
    point has another with activation >= and xent <= (one of them strictly); among identical
    points the first added is kept. The whole front is kept (a 2-D front stays small), so a point
    once dropped never comes back; `spread` picks an evenly spaced subset for output."""

    def __init__(self):
        self.ids = torch.zeros(0, 0, dtype=torch.long)
        self.activation = torch.zeros(0, dtype=torch.float64)
        self.xent = torch.zeros(0, dtype=torch.float64)

    def add(self, ids: Tensor, activation: Tensor, xent: Tensor) -> None:
        ids = torch.cat([self.ids, ids]) if len(self.ids) else ids
        act, xe = torch.cat([self.activation, activation.double()]), torch.cat([self.xent, xent.double()])
        # Sort by xent, then activation (higher first), stable so the earlier of equal points comes
        # first; a point is on the front when its activation beats every point before it.
        order = torch.sort(-act, stable=True).indices
        order = order[torch.sort(xe[order], stable=True).indices]
        sorted_act = act[order]
        before = torch.cat([sorted_act.new_full((1,), -math.inf), sorted_act.cummax(0).values[:-1]])
        keep = order[sorted_act > before]
        self.ids, self.activation, self.xent = ids[keep], act[keep], xe[keep]

    def best(self, max_xent: float = math.inf) -> int | None:
        """The index of the most active point with xent at most `max_xent` (None: no such point)."""
        fits = (self.xent <= max_xent).nonzero()[:, 0]
        return int(fits[self.activation[fits].argmax()]) if len(fits) else None

    def spread(self, size: int) -> Front:
        """At most `size` points evenly spaced along the front (by rank), both ends included; with
        `size` 1, the most active point."""
        out = Front()
        n = len(self.activation)
        picks = torch.arange(n) if n <= size else (
            torch.tensor([n - 1]) if size == 1 else torch.linspace(0, n - 1, size).round().long().unique())
        out.ids, out.activation, out.xent = self.ids[picks], self.activation[picks], self.xent[picks]
        return out


def check_length(prefix: Tensor, init: Tensor) -> None:
    """EPO's fluency needs a token predicted from one before it: two searched tokens, or a prefix."""
    if len(prefix) == 0 and init.shape[1] < 2:
        raise FeatoptError("EPO scores fluency as the model's prediction of each token from those before it: "
                           "search at least 2 tokens, or give a --prefix.")


def epo(adapter: ModelAdapter, objective: Objective, *, prefix: Tensor, init: Tensor, allowed: Tensor,
        settings: SwapSettings, lambdas: list[float], batch_size: int = 0, pool: bool = False,
        seeds: Tensor | None = None, seed_problems: Tensor | None = None, floors: Tensor | None = None,
        likely: list[int] | None = None, fronts: list[Front] | None = None,
        on_step: Callable | None = None) -> tuple[SwapState, list[Front]]:
    """Search every problem with one member per lambda from `init [P, N]` after `prefix [L]`
    (`init [P * len(lambdas), N]`: each member its own start, problem-major); the final state
    (rows problem-major: every lambda of a problem) and each problem's whole front.

    Pooled (several problems), one forward scores a candidate for every problem: each member
    ranks every candidate of every problem by its own problem's loss and lambda, and every
    problem's front takes every candidate. `seeds [S, N]` (pooled) are scored at the start for
    every problem and feed the buffers and fronts; `seed_problems [S]` says whose each is.
    `floors [P, len(lambdas)]`: member m of problem p pays `lambda_m * max(xent - floors[p, m], 0)`,
    a fluency budget (default 0: EPO's `lambda_m * xent`). `likely[m] = M > 0`: member m draws its
    swaps among the model's own M likeliest tokens at each position (see `swap_search`). `fronts`:
    one empty `Front` per problem to grow (so that `on_step` can read them; default new ones)."""
    check_discrete(objective, "EPO")
    check_length(prefix, init)
    n, n_lam = objective.n_problems, len(lambdas)
    pool = pool and n > 1
    if seeds is not None and not pool:
        raise FeatoptError("seeds are scored for every problem at once: they need a pooled search of several problems.")
    model = CandidateModel(adapter, list(objective.sites), ObjectiveLoss(objective, adapter), prefix, xent=True,
                           batch_size=batch_size)
    rows_problem = torch.arange(n).repeat_interleave(n_lam)  # problem-major: every lambda of a problem
    lam = torch.tensor(lambdas, dtype=torch.float64).repeat(n)
    fronts = [Front() for _ in range(n)] if fronts is None else fronts
    starts = init if len(init) == n * n_lam else init.repeat_interleave(n_lam, dim=0)

    def grow(step, state, evaluated) -> None:
        for p, front in enumerate(fronts):
            if evaluated.all is not None:
                front.add(evaluated.ids, -evaluated.all[:, p], evaluated.xent)
                continue
            mine = evaluated.problems == p
            if mine.any():
                front.add(evaluated.ids[mine], -evaluated.loss[mine], evaluated.xent[mine])
        if on_step is not None:
            on_step(step, state, evaluated)

    floor = floors.reshape(-1).double() if floors is not None else None
    rows_likely = torch.tensor(likely, dtype=torch.long).repeat(n) if likely is not None else None
    state = swap_search(model, starts, rows_problem, allowed.to(adapter.device), settings, lam=lam, floor=floor,
                        share=not pool, likely=rows_likely,
                        pool=pool, seeds=seeds, seed_problems=seed_problems, on_step=grow)
    return state, fronts


def records(adapter: ModelAdapter, objective: Objective, state: SwapState, fronts: list[Front], prefix: Tensor, *,
            lambdas: list[float], front_size: int, seed: int) -> tuple[list[FeatureResult], list[dict]]:
    """One result per problem holding its front (each point re-measured by plain forwards) and each
    member's answer; the answer is the front's best-scoring point (for maximize: its most active).
    Also `fronts.json`'s entries."""
    results, document, stamp, n_lam = [], [], versions(), len(lambdas)
    described, maps = descriptions(objective), feature_maps(objective, adapter)
    for p, (site, spec) in enumerate(labels(objective)):
        front = fronts[p].spread(front_size)
        ids = torch.cat([prefix.cpu().expand(len(front.ids), -1), front.ids], dim=1)
        measured = remeasure(adapter, objective, ids, torch.full((len(ids),), p))
        xent = prompt_xent(adapter, ids, len(prefix))
        points = [{"token_ids": ids[i].tolist(), "text": adapter.decode(ids[i].tolist()),
                   "activation": float(measured.activation[i]), "score": float(measured.score[i]),
                   "xent": float(xent[i]), "search_activation": float(front.activation[i]),
                   "search_xent": float(front.xent[i])} for i in range(len(ids))]
        members = []
        for m, value in enumerate(lambdas):
            r = p * n_lam + m
            row = torch.cat([prefix.cpu(), state.ids[r]]).tolist()
            members.append({"lambda": value, "token_ids": row, "text": adapter.decode(row),
                            "search_activation": -float(state.loss[r]), "search_xent": float(state.xent[r]),
                            "trajectory": state.trajectory[r]})
        answer = points[max(range(len(points)), key=lambda i: points[i]["score"])]  # the objective's best
        results.append(FeatureResult(
            spec=spec, site=site, method="epo", objective=f"{described[p]} - lambda * xent, lambda in {lambdas}",
            token_ids=answer["token_ids"], tokens=[adapter.decode([t]) for t in answer["token_ids"]], text=answer["text"],
            activation=answer["activation"], model=adapter.name, bos=adapter.bos, seed=seed,
            feature_map=maps[p],
            dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"prefix_length": len(prefix), "xent": answer["xent"], "score": answer["score"], "front": points,
                   "members": members, "forward_evaluations": int(state.evaluations[p]), "steps": state.steps_run,
                   "gradient_evaluations": state.steps_run * n_lam},
        ))
        document.append({"site": site, "spec": spec, "front": points})
    return results, document


def member_labels(members: list[dict], front: list[dict], near: float = 0.02) -> dict[tuple[float, float], list[float]]:
    """Members' answers that land on (or within `near` of the axes' span of) the same point, as one
    point with all their lambdas: several members often converge on one answer, and one label each
    would print over one another. `{(xent, activation): [lambda, ...]}`, the first member's point."""
    xs = [q["xent"] for q in front] + [m["search_xent"] for m in members]
    ys = [q["activation"] for q in front] + [m["search_activation"] for m in members]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: dict[tuple[float, float], list[float]] = {}
    for m in members:
        x, y = m["search_xent"], m["search_activation"]
        at = next((p for p in groups if abs(p[0] - x) <= near * dx and abs(p[1] - y) <= near * dy), (x, y))
        groups.setdefault(at, []).append(m["lambda"])
    return groups


def plot_fronts(results: list[FeatureResult], path: Path, most: int = 20) -> None:
    """One panel per problem (the first `most`): the front, xent against activation, each point
    re-measured; each member's final answer marked with its lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = results[:most]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        front = sorted(r.extra["front"], key=lambda q: q["xent"])
        ax.plot([q["xent"] for q in front], [q["activation"] for q in front], "o-", ms=3, lw=1, label="front")
        labels = member_labels(r.extra["members"], front)
        middle = (min(q["xent"] for q in front) + max(q["xent"] for q in front)) / 2
        for (x, y), lambdas in labels.items():
            ax.plot([x], [y], "x", ms=4, color="tab:orange")
            right = x > middle  # written leftwards there, so the label stays inside the panel
            ax.annotate("λ=" + ", ".join(f"{lam:g}" for lam in lambdas), (x, y), xytext=(-3 if right else 3, 3),
                        textcoords="offset points", ha="right" if right else "left", fontsize=6, alpha=0.8)
        ax.set_title(f"{r.site} {r.spec}", fontsize=8)
        ax.set_xlabel("xent (nats/token)", fontsize=7)
        ax.set_ylabel("activation", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("EPO fronts: activation against the model's cross-entropy of the prompt", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
