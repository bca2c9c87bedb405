"""Reports of a deactivation run (document 003, §5.1-5.2): plain-text tables, a JSON-able
record, Figure 6-7 (:func:`plot_methods`) and Figure 8 (:func:`plot_sweep`), from the results of
:mod:`featopt.feature_flow.deactivate` (and the events of :mod:`featopt.feature_flow.events`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from featopt.feature_flow.deactivate import DeactivationResult, SweepResult
from featopt.feature_flow.events import Events
from featopt.feature_flow.groups import GROUPS


def _fmt(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


def format_deactivation(results: Sequence[DeactivationResult] = (), sweep: SweepResult | None = None,
                        events: Events | None = None) -> str:
    """Plain-text tables: per method and group, alone vs with others, and the r sweep."""
    lines = []
    if events is not None:
        lines.append(f"{len(events)} events sampled of {events.population} (seed {events.seed})")
    for res in results:
        s = res.summary()
        lines += ["", f"method {s['method']}, r = {s['r']:g}: {s['count']} rows, mean relative change "
                      f"{_fmt(s['mean_relative'])}, deactivated {_fmt(s['fraction_deactivated'])}",
                  f"  {'group':<22}{'count':>7}{'mean rel':>10}{'deact':>8}"]
        rows = list(s["groups"].items()) + [("(alone)", s["alone"]), ("(with others)", s["with_others"])]
        rows += [(f"  {p} {k.replace('_', ' ')}", v[k]) for p, v in s["by_predecessor"].items() for k in v]
        for name, g in rows:
            lines.append(f"  {name:<22}{g['count']:>7}{_fmt(g['mean_relative']):>10}"
                         f"{_fmt(g['fraction_deactivated']):>8}")
    if sweep is not None:
        lines += ["", f"r sweep over {len(sweep.event)} events (all active top-1 predecessors rescaled)",
                  f"  {'r':>6}{'mean rel':>10}{'deact':>8}{'loss rel':>10}"]
        for p in sweep.summary()["points"]:
            lines.append(f"  {p['r']:>6g}{_fmt(p['mean_relative']):>10}{_fmt(p['fraction_deactivated']):>8}"
                         f"{_fmt(p['mean_loss_relative']):>10}")
    return "\n".join(lines).strip() + "\n"


def record(events: Events | None = None, results: Sequence[DeactivationResult] = (),
           sweep: SweepResult | None = None) -> dict:
    """A JSON-able record of a deactivation run, with the versions of everything."""
    from featopt.results import versions

    return {"kind": "flow-deactivate", "versions": versions(),
            "events": events.record() if events is not None else None,
            "methods": [res.record() for res in results], "sweep": sweep.record() if sweep is not None else None}


def plot_methods(results: Sequence[DeactivationResult], path: str | Path) -> Path:
    """Figure 6 (fraction deactivated and mean relative change per group, a bar per method) and
    Figure 7 (mean relative change, predecessor alone vs with others)."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    summaries = [res.summary() for res in results]
    groups = [g for g in GROUPS if any(g in s["groups"] for s in summaries)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 3, 1.4]})
    width = 0.8 / max(1, len(summaries))
    for m, s in enumerate(summaries):
        label = f"{s['method']} (r={s['r']:g})"
        for ax, field in zip(axes[:2], ("fraction_deactivated", "mean_relative")):
            values = [(s["groups"].get(g, {}).get(field) or 0.0) for g in groups]
            ax.bar([i + m * width for i in range(len(groups))], values, width, label=label)
        values = [s[k]["mean_relative"] or 0.0 for k in ("alone", "with_others")]
        axes[2].bar([i + m * width for i in range(2)], values, width, label=label)
    for ax, title in zip(axes, ("fraction deactivated (z_new = 0)", "mean relative change of f",
                                "mean relative change")):
        ax.set_title(title)
    for ax in axes[:2]:
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=30, ha="right", fontsize=8)
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(2)], ["alone", "with others"])
    axes[0].legend(fontsize=8)
    return save_figure(fig, plt, path)


def plot_sweep(sweep: SweepResult, path: str | Path) -> Path:
    """Figure 8: mean relative change of f (left axis) and of the loss (right axis) against r."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    points = sweep.summary()["points"]
    rs = [p["r"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(rs, [p["mean_relative"] or 0.0 for p in points], "o-", color="C0")
    ax.set_xlabel("rescaling coefficient r")
    ax.set_ylabel("mean relative activation change", color="C0")
    twin = ax.twinx()
    twin.plot(rs, [p["mean_loss_relative"] or 0.0 for p in points], "s--", color="C3")
    twin.set_ylabel("relative loss change", color="C3")
    ax.set_title(f"all active top-1 predecessors rescaled ({len(sweep.event)} events)")
    return save_figure(fig, plt, path)
