"""PNG figures in the style of source document 004: normalized token probability across every
neuron of the model (its Figure 2) and a token's probability against a clamped neuron's value
(its Figure 3). matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_normalized(normalized: dict[int, Tensor], label: str, path: str | Path, *, hits: Sequence = (),
                    model: str = "") -> Path:
    """Normalized probability of `label` at every neuron `{layer: [neurons]}`, layers side by side on
    one axis (neuron index across the model), the best `hits` annotated with their layer and neuron."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.6))
    offsets, start = {}, 0
    for i, (layer, values) in enumerate(normalized.items()):
        offsets[layer] = start
        x = torch.arange(start, start + len(values))
        ax.plot(x.numpy(), values.float().numpy(), lw=0.6, color="C0" if i % 2 == 0 else "C9")
        start += len(values)
    for h in hits:
        x, y = offsets[h.layer] + h.neuron, h.normalized
        right = x > 0.75 * sum(len(v) for v in normalized.values())  # label to the left near the right edge
        ax.annotate(f"layer {h.layer}, neuron {h.neuron}", (x, y), xytext=(-6 if right else 6, 0), textcoords="offset points",
                    fontsize=8, va="center", ha="right" if right else "left", color="C3")
        ax.plot([x], [y], "o", ms=3, color="C3")
    layers = list(normalized)
    step = max(1, len(layers) // 16)
    ax.set_xticks([offsets[lay] + len(normalized[lay]) / 2 for lay in layers[::step]], [str(lay) for lay in layers[::step]])
    ax.set_xlim(0, start)
    ax.set_xlabel("layer (neurons of each layer side by side)")
    ax.set_ylabel("normalized probability")
    ax.set_title(f"{label!r}: p(token) / mean of each neuron's top probabilities" + (f" ({model})" if model else ""))
    return save_figure(fig, plt, path)


def plot_sweep(values: Tensor, probs: Tensor, path: str | Path, *, title: str, natural: float | None = None,
               baseline: float | None = None) -> Path:
    """A target token's next-token probability against the clamped neuron's value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(values.numpy(), probs.numpy(), "o-", ms=3)
    if natural is not None:
        ax.axvline(natural, color="grey", ls=":", lw=1, label=f"natural value {natural:.3g}")
    if baseline is not None:
        ax.axhline(baseline, color="C3", ls="--", lw=1, label=f"unclamped p = {baseline:.3g}")
    if natural is not None or baseline is not None:
        ax.legend(fontsize=8)
    ax.set_xlabel("clamped neuron value")
    ax.set_ylabel("probability of the target token")
    top = max(float(probs.max()), baseline or 0.0)
    ax.set_ylim(0, 1.02 if top > 0.3 else 1.15 * top or 1.0)  # small probabilities: zoom in, axis from 0
    ax.set_title(title, fontsize=9)
    return save_figure(fig, plt, path)


def save_figure(fig, plt, path: str | Path) -> Path:
    from featopt.results import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
