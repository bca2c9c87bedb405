"""A PNG of an attribution graph, in the layout of its HTML page (`page.py`): x the token position
(the prompt's tokens under the columns), y the layer (embeddings at the bottom, logits on top);
features are circles, errors squares, embeddings diamonds, logits triangles; links blue when
positive and red when negative, their opacity and width by |weight| over the largest.

:func:`write_graph_png` draws at most `MAX_LINKS` links, the strongest by |weight|, so that a graph
of a thousand nodes and several thousand links stays readable; the title then says so. The title
holds the prompt, the top logit and the two scores (from `summary.json`, when given).
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

from featopt.dictionaries.page_parts import BLUE, RED, finite
from featopt.attribution.page import (
    BOTTOM, COLOURS, EMBEDDING, ERROR, FEATURE, KINDS, LEFT, LOGIT, STEP, TOP, graph_layout, logits, strongest, visible,
)
from featopt.plots import pyplot, save_figure

MAX_LINKS = 2000
MARKERS = {FEATURE: "o", ERROR: "s", EMBEDDING: "D", LOGIT: "^"}  # the page's circles, squares, diamonds, triangles


def _rgb(colour: str) -> tuple[float, float, float]:
    """The page's colours (`"rgb(r,g,b)"`, `"r,g,b"` or `"#rrggbb"`) as matplotlib's 0-1 floats."""
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return tuple(int(v) / 255 for v in colour.removeprefix("rgb(").removesuffix(")").split(","))


def title(doc: dict, summary: dict | None, drawn: int, width: int = 100) -> str:
    """The figure's title, lines of at most `width` characters: the prompt (two lines at most), the
    top logit, the scores, and how many links are drawn."""
    summary, prompt = summary or {}, str(doc["metadata"].get("prompt", ""))
    top = logits(doc, summary)
    head = repr(prompt if len(prompt) <= 2 * width else prompt[:2 * width - 8] + "…") + (f" ({summary['model']})" if summary.get("model") else "")
    lines = textwrap.wrap(head, width, max_lines=2, placeholder=" …", drop_whitespace=False) or [""]
    facts = [f"top logit {top[0][0]!r} (p = {top[0][1]:.3g})"] if top else []
    facts += [f"{name} score {summary[key]:.3f}" for name, key in (("replacement", "replacement_score"),
                                                                   ("completeness", "completeness_score")) if finite(summary.get(key))]
    links = len(doc["links"])
    facts.append(f"{len(doc['nodes']):,} nodes, " + (f"{links:,} links" if drawn == links else
                                                      f"the strongest {drawn:,} of {links:,} links drawn"))
    return "\n".join(lines + textwrap.wrap(" · ".join(facts), width))


def write_graph_png(doc: dict, path: str | Path, *, summary: dict | None = None) -> Path:
    """Draw `graph_json`'s `doc` to the PNG `path` (see the module docstring); returns `path`."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    plt = pyplot()
    lay = graph_layout(doc)
    links = strongest([k for k in doc["links"] if k["source"] in lay.xy and k["target"] in lay.xy], MAX_LINKS)
    # The figure grows with the layout up to a poster's size; markers shrink to fit their spacing.
    width, height = min(24.0, max(8.0, lay.width / 100)), min(15.0, max(5.0, lay.height / 100 + 1.5))
    size = min(60.0, max(4.0, (0.75 * STEP * width * 72 / lay.width) ** 2))
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        top = max((abs(k["weight"]) for k in links), default=0.0)
        segments, colours, widths = [], [], []
        for k in links:
            s = abs(k["weight"]) / top if top > 0 else 0.0
            segments.append([lay.xy[k["source"]], lay.xy[k["target"]]])
            colours.append((*_rgb(RED if k["weight"] < 0 else BLUE), 0.06 + 0.74 * s))
            widths.append(0.3 + 2.2 * s)
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=widths, zorder=1))
        for kind, marker in MARKERS.items():
            nodes = [n for n in doc["nodes"] if n["feature_type"] == kind]
            if not nodes:
                continue
            target = [bool(n.get("is_target_logit")) for n in nodes]
            label = f"{KINDS[kind]} ({len(nodes):,}{'; outlined: the target' if kind == LOGIT else ''})"
            ax.scatter([lay.xy[n["node_id"]][0] for n in nodes], [lay.xy[n["node_id"]][1] for n in nodes], s=size, marker=marker,
                       color=_rgb(COLOURS[kind]), edgecolors=["black" if t else "white" for t in target],
                       linewidths=[1.5 if t else 0.5 for t in target], zorder=2, label=label)
        handles, _ = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color=_rgb(c), lw=2, label=name)
                    for name, c in (("positive link", BLUE), ("negative link", RED))]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        crowded = max(len(visible(t)) * 7.5 / w for t, w in zip(lay.tokens, lay.widths)) > 1 if lay.tokens else False
        ax.set_xticks(lay.columns, [visible(t, 16) for t in lay.tokens], fontsize=8, family="monospace",
                      rotation=45 if crowded else 0, ha="right" if crowded else "center")
        ax.set_yticks([y for y, _ in lay.rows], [label for _, label in lay.rows], fontsize=8)
        for label in ax.get_xticklabels():
            label.set_parse_math(False)  # a token with `$` is text, not mathtext
        ax.set_xlim(LEFT, lay.width)
        ax.set_ylim(lay.height - BOTTOM, TOP)  # y grows downwards, as in the SVG: embeddings at the bottom
        ax.grid(axis="y", color="#eaeef2", lw=0.8, zorder=0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_xlabel("token position")
        ax.set_title(title(doc, summary, len(links), int(width * 11)), fontsize=9, loc="left", parse_math=False)
        with warnings.catch_warnings():  # tokens in scripts the default font lacks: boxes, not a warning per glyph
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            return save_figure(fig, plt, path)
    finally:
        plt.close(fig)
