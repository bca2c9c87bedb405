"""The latent density histogram: how many latents fire how often, on a log10 scale.

A latent's density is its firing frequency, the fraction of tokens on which it is `> 0`
(:class:`featopt.dictionaries.metrics.FiringFrequency`, the `firing_frequency` of
:func:`featopt.dictionaries.evaluate.evaluate`). As in Anthropic's "Towards Monosemanticity" and
SAELens' feature density plots, the histogram is over `log10(density)`; dead latents (density 0,
no logarithm) get a bar of their own at the left, labelled "dead", and their count is in the title.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError


@dataclass
class DensityHistogram:
    """`counts[i]` live latents have `edges[i] <= log10(density) < edges[i + 1]` (the last bin
    includes its right edge); `dead` latents never fired."""

    edges: Tensor
    counts: Tensor
    dead: int
    latents: int


def density_histogram(frequency: Tensor, bins: int = 50) -> DensityHistogram:
    """The histogram of `log10(frequency)` over the live latents of `frequency [d_sae]` (values in
    [0, 1]), from the decade below the rarest live latent to 10^0, in `bins` equal bins."""
    freq = frequency.detach().double().flatten().cpu()
    if freq.numel() == 0 or bins < 1:
        raise FeatoptError(f"a density histogram needs at least one latent and one bin, got {freq.numel()} and {bins}.")
    if ((freq < 0) | (freq > 1) | freq.isnan()).any():
        raise FeatoptError("firing frequencies are fractions of tokens: every one must be between 0 and 1.")
    live = freq[freq > 0].log10()
    low = math.floor(live.min().item() + 1e-6) if live.numel() else -1.0  # 1e-4 in float32 is still decade -4
    low = min(low, -1.0)  # at least one decade wide
    live = live.clamp(low, 0.0)  # a rounding error below `low` still counts, in the first bin
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.zeros(bins, dtype=torch.long)
    if live.numel():
        counts = torch.histc(live, bins=bins, min=low, max=0.0).round().long()
    return DensityHistogram(edges, counts, int((freq == 0).sum()), freq.numel())


def plot_density(frequency: Tensor, path: str | Path, *, title: str = "", tokens: int | None = None,
                 bins: int = 50) -> Path:
    """A PNG of :func:`density_histogram`: live latents by log10 firing frequency, the dead ones in a
    separate bar labelled "dead" (`tokens`: how many tokens the frequencies were counted on, for the
    title: no density below `1 / tokens` can be seen)."""
    from featopt.plots import pyplot, save_figure

    hist = density_histogram(frequency, bins)
    edges, counts = hist.edges.numpy(), hist.counts.numpy()
    width = float(edges[1] - edges[0])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(edges[:-1], counts, width=width, align="edge", color="C0", label="live latents")
    dead_x = float(edges[0]) - 0.5 - 2 * width  # half a decade left of the live bins
    ax.bar([dead_x], [hist.dead], width=2 * width, align="edge", color="C3", label=f"dead: {hist.dead}")
    ticks = [float(t) for t in range(int(edges[0]), 1)]
    ax.set_xticks([dead_x + width] + ticks, ["dead"] + [f"{t:g}" for t in ticks])
    ax.set_xlim(dead_x - width, float(edges[-1]) + width)
    ax.set_xlabel("log10 firing frequency (fraction of tokens on which the latent is > 0)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=8)
    share = hist.dead / hist.latents
    heading = f"{hist.latents} latents, {hist.dead} dead ({share:.1%})" + (f", {tokens} tokens" if tokens else "")
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    return save_figure(fig, plt, path)
