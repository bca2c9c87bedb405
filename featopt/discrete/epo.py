"""EPO-style fluent search (Thompson et al. 2024, "Fluent dreaming for language models"): inputs
that make a feature fire AND read like text. A population per problem, one member per fluency
weight lambda; member m minimizes `-activation + lambda_m * xent`, with xent the model's own mean
next-token cross-entropy of the prompt. Each step every member proposes GCG swaps from its own
token gradients, all of a problem's candidates are scored once (activation and xent, one forward
to the LM head), and each member takes the best of the shared pool under its own lambda. Every
scored sequence feeds the problem's Pareto front (activation up, xent down), written as JSON and
a PNG. `run(EPOConfig(...))` is the one entry point.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.results import FeatureResult, atomic_write, versions, write_results
from featopt.discrete import gcg
from featopt.discrete.candidates import CandidateModel, prompt_xent
from featopt.discrete.common import SearchRun, format_table as common_table, load, out_dir, parse_candidates, spawn
from featopt.discrete.swap_search import swap_search
from featopt.discrete.sweep import distributed
from featopt.discrete.tokens import allowed_ids

__all__ = ["EPOConfig", "Front", "run", "format_table"]


@dataclass
class EPOConfig(gcg.SwapConfig):
    """Settings of one EPO search (the flags of `featopt search epo`): GCG's, plus the lambdas."""

    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    search_width: int = 128  # per member: the pool of a problem is members x this
    front_size: int = 64  # most points reported per front (evenly spread along it; 1: the most active)


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
        act, xe = torch.cat([self.activation, activation]), torch.cat([self.xent, xent])
        # Sort by xent (then activation, higher first; stable, so the earlier of equal points
        # first); a point is on the front when its activation beats every point of lower xent.
        order = sorted(range(len(act)), key=lambda i: (float(xe[i]), -float(act[i])))
        keep, best = [], -math.inf
        for i in order:
            if float(act[i]) > best:
                keep.append(i)
                best = float(act[i])
        keep = torch.tensor(keep, dtype=torch.long)
        self.ids, self.activation, self.xent = ids[keep], act[keep], xe[keep]

    def spread(self, size: int) -> Front:
        """At most `size` points evenly spaced along the front (by rank), both ends included; with
        `size` 1, the most active point."""
        out = Front()
        n = len(self.activation)
        picks = torch.arange(n) if n <= size else (
            torch.tensor([n - 1]) if size == 1 else torch.linspace(0, n - 1, size).round().long().unique())
        out.ids, out.activation, out.xent = self.ids[picks], self.activation[picks], self.xent[picks]
        return out


def _check(config: EPOConfig) -> None:
    gcg.check(config)
    lambdas = config.lambdas
    if not lambdas or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in lambdas):
        raise FeatoptError(f"--lambdas {lambdas!r} is not valid: give a list of finite, non-negative weights, "
                           "like [0, 0.5, 1, 2].")
    if len(set(lambdas)) != len(lambdas):
        raise FeatoptError(f"--lambdas {lambdas!r} repeats a weight: give distinct weights.")
    if config.front_size < 1:
        raise FeatoptError(f"--front_size must be at least 1, got {config.front_size}.")


def run(config: EPOConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Search every problem with one member per lambda; one result per (site, problem) holding its
    front (re-measured by plain forwards) and each member's answer; `out/fronts.json`, `out/fronts.png`."""
    _check(config)
    if config.devices > 1 and distributed()[1] == 1:
        return spawn(run, config, adapter)
    adapter = load(config, adapter)
    plans = gcg.plan(config, adapter)
    allowed = allowed_ids(adapter, config.allow, parse_candidates(config.candidates, adapter.vocab_size))
    problems = [(site, p) for site, ps in plans for p in ps]
    prefix, init = gcg.start(config, adapter, allowed, len(problems))
    if len(prefix) == 0 and init.shape[1] < 2:
        raise FeatoptError("EPO scores fluency as the model's prediction of each token from those before it: "
                           "search at least 2 tokens, or give a --prefix.")
    n_tokens, n_lam = len(prefix) + init.shape[1], len(config.lambdas)
    loss = gcg.FeatureLoss(plans, [adapter.width(s) for s, _ in plans],
                           gcg.position_weights(config.variant, len(problems), n_tokens))
    model = CandidateModel(adapter, [s for s, _ in plans], loss, prefix, xent=True, batch_size=config.batch_size)
    rows_problem = torch.arange(len(problems)).repeat_interleave(n_lam)  # problem-major: every lambda of a problem
    lam = torch.tensor(config.lambdas, dtype=torch.float64).repeat(len(problems))
    fronts = [Front() for _ in problems]

    def grow(step, state, evaluated) -> None:
        for p, front in enumerate(fronts):
            mine = evaluated.problems == p
            if mine.any():
                front.add(evaluated.ids[mine], -evaluated.loss[mine], evaluated.xent[mine])

    out = out_dir(config)
    log = gcg.Trajectory(out, [f"epo/{site}/{p.spec}/lambda={v:g}/activation" for site, p in problems for v in config.lambdas])

    def on_step(step, state, evaluated) -> None:
        grow(step, state, evaluated)
        log(step, state, evaluated)

    try:
        state = swap_search(model, init.repeat_interleave(n_lam, dim=0), rows_problem, allowed.to(adapter.device),
                            gcg.settings_of(config, "epo"), lam=lam, share=True, on_step=on_step)
    finally:
        log.close()
    results, document, stamp = [], [], versions()
    for p, (site, problem) in enumerate(problems):
        front = fronts[p].spread(config.front_size)
        ids = torch.cat([prefix.cpu().expand(len(front.ids), -1), front.ids], dim=1)
        measured, _ = gcg.measure(adapter, [(site, [problem] * len(ids))], ids, config.variant)
        xent = prompt_xent(adapter, ids, len(prefix))
        points = [{"token_ids": ids[i].tolist(), "text": adapter.decode(ids[i].tolist()), "activation": float(measured[i]),
                   "xent": float(xent[i]), "search_activation": float(front.activation[i]),
                   "search_xent": float(front.xent[i])} for i in range(len(ids))]
        members = []
        for m, value in enumerate(config.lambdas):
            r = p * n_lam + m
            row = torch.cat([prefix.cpu(), state.ids[r]]).tolist()
            members.append({"lambda": value, "token_ids": row, "text": adapter.decode(row),
                            "search_activation": -float(state.loss[r]), "search_xent": float(state.xent[r]),
                            "trajectory": state.trajectory[r]})
        best = max(range(len(points)), key=lambda i: points[i]["activation"])
        answer = points[best]
        results.append(FeatureResult(
            spec=problem.spec, site=str(site), method="epo",
            objective=f"maximize({site}, {'last position' if config.variant == 'last' else 'sum over positions'}) "
                      f"- lambda * xent, lambda in {config.lambdas}",
            token_ids=answer["token_ids"], tokens=[adapter.decode([t]) for t in answer["token_ids"]], text=answer["text"],
            activation=answer["activation"], model=adapter.name, bos=adapter.bos, seed=config.seed,
            feature_map=adapter.describe_features(site), dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"prefix_length": len(prefix), "xent": answer["xent"], "front": points, "members": members,
                   "forward_evaluations": int(state.evaluations[p]), "steps": state.steps_run,
                   "gradient_evaluations": state.steps_run * n_lam},
        ))
        document.append({"site": str(site), "spec": problem.spec, "front": points})
    if distributed()[0] == 0:
        meta = {"method": "epo", "config": asdict(config), "model": adapter.name, "world_size": distributed()[1],
                "sites": [str(s) for s, _ in plans], "prefix_ids": prefix.tolist(), "allowed_tokens": len(allowed)}
        write_results(out, results, meta)
        text = json.dumps({"run": meta, "fronts": document}, indent=2, ensure_ascii=False)
        atomic_write(out / "fronts.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        plot_fronts(results, out / "fronts.png")
    return SearchRun(results, out)


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


def format_table(results: list[FeatureResult]) -> str:
    """The searches' table of the most active front point per problem, then each front from its
    most fluent point to its most active: `xent -> activation` and the text."""
    lines = [common_table(results), ""]
    for r in results:
        lines.append(f"{r.site} {r.spec}: front of {len(r.extra['front'])} (xent nats/token, activation)")
        for q in sorted(r.extra["front"], key=lambda q: q["xent"]):
            lines.append(f"  {q['xent']:7.3f}  {q['activation']:9.4g}  {q['text']!r}")
    return "\n".join(lines)
