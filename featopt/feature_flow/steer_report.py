"""Reports of a steering run (document 003, Figures 9-11): the plain-text table, the picture of
theme score against coherence, and the JSON record, from a :class:`~featopt.feature_flow.steer.SteeringResult`."""

from __future__ import annotations

import json
from pathlib import Path

from featopt.feature_flow.steer import BASELINE, Outcome, SteeringResult


def format_steering(result: SteeringResult) -> str:
    """The rows as a plain-text table."""
    def cell(v):
        return "-" if v is None or v == "" else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["setting", "mode", "features", "theme", "perplexity", "distinct", "word_logprob"]
    rows = [[cell(row[k]) for k in head] for row in result.rows()]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot_steering(result: SteeringResult, path: str | Path) -> Path:
    """Coherence (perplexity, log x) against theme score (y): one line per strategy through its r
    values, each point annotated with r; the unsteered baseline in black, dashed (Figures 9-11)."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    strategies: dict[str, list[Outcome]] = {}
    for outcome in result.outcomes:
        strategies.setdefault(outcome.setting.strategy, []).append(outcome)
    for i, (strategy, outcomes) in enumerate(strategies.items()):
        outcomes = sorted(outcomes, key=lambda o: o.setting.r)
        xs, ys = [o.mean("perplexity") for o in outcomes], [o.mean("theme") for o in outcomes]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=strategy)
        for o, x, y in zip(outcomes, xs, ys):
            ax.annotate(f"r={o.setting.r:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    x0, y0 = result.baseline.mean("perplexity"), result.baseline.mean("theme")
    ax.axhline(y0, color="black", ls="--", lw=0.8)
    ax.plot([x0], [y0], "kx", ms=8, label=BASELINE)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the generation, unsteered model (lower: more coherent)")
    ax.set_ylabel("theme score (mean target activation)")
    ax.set_title(f"steering {result.model}: targets {', '.join(map(str, result.targets[:4]))}"
                 + (" ..." if len(result.targets) > 4 else ""), fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def save_steering(result: SteeringResult, path: str | Path) -> Path:
    """The record as JSON, written atomically."""
    from featopt.results import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result.record(), indent=1)))
    return path
