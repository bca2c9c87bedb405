"""A static HTML view of an attribution graph: one self-contained file that opens from file://.

:func:`write_graph_page` draws `graph_json`'s `doc` (the pruned graph) as an inline SVG: x the
token position (the prompt's tokens written under the columns), y the layer (token embeddings at
the bottom, then layers 0 to n-1, the logits on top). Features are circles, error nodes squares,
embeddings diamonds and logits triangles (the target logit outlined); several nodes of one (layer,
position) sit side by side in its column. Each link is a line, blue when positive and red when
negative, its opacity and width by |weight| over the largest (at most `MAX_PAGE_LINKS`, the
strongest: a pruned graph of a short prompt keeps 100,000s). Every node and link has a tooltip.
Hovering a node (or a row of the table) brings out its incoming and outgoing links and fades the
rest; a click pins that. A feature links to its latent's page where `dashboards` names a
dashboard (`featopt sae dashboard`) for its layer. Above the graph: the prompt, model, scores and
logits (the scores from `summary.json`); below it, a table of the nodes, most influential first.

Nothing is fetched: the dashboard's CSS and a few lines of script are inline, and the script reads
the graph from the SVG's own attributes. Every token and text from the graph is HTML-escaped.
:func:`graph_layout` places the nodes; `plot.py` draws the same layout as a PNG.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from featopt.atomic import atomic_write
from featopt.dictionaries.dashboard import CSS
from featopt.dictionaries.page_parts import BLUE, ORANGE, RED, WHITESPACE, finite, num, tok

FEATURE, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"
KINDS = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding", LOGIT: "logit"}  # feature_type -> short name
COLOURS = {FEATURE: f"rgb({ORANGE})", ERROR: "#8c959f", EMBEDDING: "#1a7f37", LOGIT: "#8250df"}  # the PNG's too
ROW, STEP, PAD, MIN_COLUMN, LEFT, TOP, BOTTOM = 64, 14, 18, 56, 64, 14, 40  # SVG layout, px
GRAPH_CSS = f"""
.graph-wrap {{ overflow: auto; border: 1px solid #d0d7de; border-radius: 4px; }} svg.graph {{ display: block; }}
svg.graph text {{ font: 11px system-ui, sans-serif; fill: #57606a; }} svg.graph text.token {{ font: 12px ui-monospace, monospace; fill: #1f2328; }}
svg.graph line.grid {{ stroke: #eaeef2; }} svg.graph .edge.pos {{ stroke: rgb({BLUE}); }} svg.graph .edge.neg {{ stroke: rgb({RED}); }}
svg.graph .node {{ cursor: pointer; }} svg.graph .node > :not(title) {{ stroke: #fff; stroke-width: 1; }}
{" ".join(f".node.{KINDS[k]} > * {{ fill: {c}; }}" for k, c in COLOURS.items())}
svg.graph .node.logit.target > :not(title) {{ stroke: #1f2328; stroke-width: 2; }}
svg.graph.focus .edge:not(.hl) {{ opacity: .06; }} svg.graph.focus .node:not(.hl) {{ opacity: .25; }}
svg.graph .edge.hl {{ stroke-opacity: 1; }} tr.hl td {{ background: #fff8c5; }} .key {{ display: flex; gap: 1.2em; flex-wrap: wrap; }}
.swatch {{ display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: -.05em; }}
"""
# The one script: it finds each node's links by the data-source / data-target attributes of the
# SVG's lines (no data is written into the script, so nothing from the graph can run as code).
SCRIPT = """<script>(() => {
  const svg = document.querySelector("svg.graph"); if (!svg) return;
  const edges = [...svg.querySelectorAll(".edge")], nodes = [...svg.querySelectorAll(".node")];
  const rows = [...document.querySelectorAll("tr[data-node]")], byId = new Map(nodes.map(n => [n.dataset.node, n]));
  let pinned = null;
  const show = id => {
    svg.classList.toggle("focus", id !== null);
    nodes.forEach(n => n.classList.toggle("hl", n.dataset.node === id));
    rows.forEach(r => r.classList.toggle("hl", r.dataset.node === id));
    for (const e of edges) {
      const on = id !== null && (e.dataset.source === id || e.dataset.target === id);
      e.classList.toggle("hl", on);
      if (on) [e.dataset.source, e.dataset.target].forEach(k => byId.get(k)?.classList.add("hl"));
    }
  };
  for (const n of nodes) {
    n.addEventListener("mouseenter", () => show(n.dataset.node));
    n.addEventListener("mouseleave", () => show(pinned));
    n.addEventListener("click", () => { pinned = pinned === n.dataset.node ? null : n.dataset.node; show(pinned); });
  }
  for (const r of rows) { r.addEventListener("mouseenter", () => show(r.dataset.node)); r.addEventListener("mouseleave", () => show(pinned)); }
})();</script>"""


@dataclass
class Layout:
    """Where `graph_layout` puts things, in SVG px (y grows downwards)."""

    xy: dict[str, tuple[float, float]]  # node_id -> centre
    columns: list[float]  # the centre x of each position
    widths: list[float]  # each position's column width
    rows: list[tuple[float, str]]  # (centre y, label), bottom row (embeddings) first
    width: float
    height: float
    tokens: list[str]


MAX_PAGE_LINKS = 5000  # links drawn, the strongest by |weight|


def strongest(links: list[dict], limit: int) -> list[dict]:
    """The `limit` links of largest |weight|, weakest first (so the strongest are drawn on top)."""
    ranked = sorted((k for k in links if finite(k["weight"])), key=lambda k: abs(k["weight"]))
    return ranked[-limit:] if limit > 0 else []


def n_layers(doc: dict) -> int:
    """The model's layer count: the logits' layer is n_layers + 1; without logits, the highest layer + 1."""
    found = [int(n["layer"]) - 1 for n in doc["nodes"] if n["feature_type"] == LOGIT]
    found += [int(n["layer"]) + 1 for n in doc["nodes"] if n["feature_type"] in (FEATURE, ERROR)]
    return max(found + [len(doc["metadata"].get("transcoder_list") or [])])


def _row(node: dict, layers: int) -> int:
    kind = node["feature_type"]
    return 0 if kind == EMBEDDING else layers + 1 if kind == LOGIT else int(node["layer"]) + 1


def latent(node: dict) -> int | None:
    """A feature node's latent index (from its id, `{layer}_{latent}_{position}`)."""
    return int(node["node_id"].split("_")[1]) if node["feature_type"] == FEATURE else None


def graph_layout(doc: dict) -> Layout:
    """x by position, y by layer; the nodes of one (layer, position) side by side, `STEP` apart
    (features by latent, then errors, logits by probability), each column as wide as its fullest cell."""
    layers, tokens = n_layers(doc), [str(t) for t in doc["metadata"].get("prompt_tokens") or []]
    positions = max([len(tokens)] + [int(n["ctx_idx"]) + 1 for n in doc["nodes"]])
    cells = defaultdict(list)
    for node in doc["nodes"]:
        cells[_row(node, layers), int(node["ctx_idx"])].append(node)
    order = {FEATURE: 0, ERROR: 1, EMBEDDING: 2, LOGIT: 3}
    for cell in cells.values():
        cell.sort(key=lambda n: (order.get(n["feature_type"], 4), latent(n) or 0, -(n.get("token_prob") or 0.0), n["node_id"]))
    fullest = [max((len(c) for (_, p), c in cells.items() if p == pos), default=1) for pos in range(positions)]
    widths = [max(MIN_COLUMN, STEP * k + PAD) for k in fullest]
    columns, x = [], LEFT
    for w in widths:
        columns.append(x + w / 2)
        x += w
    n_rows = layers + 2
    rows = [(TOP + (n_rows - 1 - r) * ROW + ROW / 2, "emb" if r == 0 else "logits" if r == n_rows - 1 else f"L{r - 1}")
            for r in range(n_rows)]
    xy = {n["node_id"]: (columns[pos] + (i - (len(cell) - 1) / 2) * STEP, rows[row][0])
          for (row, pos), cell in cells.items() for i, n in enumerate(cell)}
    return Layout(xy, columns, widths, rows, x + 12, TOP + n_rows * ROW + BOTTOM, tokens + [""] * (positions - len(tokens)))


def visible(token, limit: int | None = None) -> str:
    """A token as plain text with its whitespace drawn (↵ ⇥ ·), cut to `limit` characters with …"""
    text = "".join(WHITESPACE.get(c, c) for c in str(token)) or "∅"
    return text if limit is None or len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def logit_token(node: dict, summary: dict | None = None) -> str:
    """A logit node's token: from summary.json's logits (by id), else from the node's clerp."""
    for row in (summary or {}).get("logits") or []:
        if row.get("id") == node.get("feature") and "token" in row:
            return str(row["token"])
    clerp = str(node.get("clerp") or "")
    return clerp[len('Output "'):clerp.rindex('" (p=')] if clerp.startswith('Output "') and '" (p=' in clerp else str(node.get("feature"))


def logits(doc: dict, summary: dict | None = None) -> list[tuple[str, float, bool]]:
    """`(token, probability, is the target)` of each logit node, most probable first."""
    out = [(logit_token(n, summary), float(n.get("token_prob") or 0.0), bool(n.get("is_target_logit")))
           for n in doc["nodes"] if n["feature_type"] == LOGIT]
    return sorted(out, key=lambda t: -t[1])


def describe(node: dict, tokens: list[str], summary: dict | None = None) -> str:
    """A node's tooltip (plain text; escape it where it goes)."""
    pos, kind = int(node["ctx_idx"]), node["feature_type"]
    where = f"position {pos} ({tokens[pos]!r})" if pos < len(tokens) else f"position {pos}"
    if kind == LOGIT:
        return f"logit {logit_token(node, summary)!r} · p = {num(node.get('token_prob'), 3)} · {where}\n{node['node_id']}"
    head = {FEATURE: f"feature · layer {node['layer']} · latent {latent(node)}", ERROR: f"error · layer {node['layer']}",
            EMBEDDING: "embedding"}.get(kind, kind)
    act = f"activation {num(node.get('activation'))} · " if node.get("activation") is not None else ""
    label = f"\n{node['clerp']}" if node.get("clerp") else ""  # a feature's label, where graph_json was given labels
    return f"{head} · {where}{label}\n{act}influence {num(node.get('influence'))}\n{node['node_id']}"


def latent_href(node: dict, dashboards: dict[int, str] | None) -> str | None:
    """The latent page of a feature node in its layer's dashboard folder (relative to the page), if any."""
    folder = (dashboards or {}).get(int(node["layer"])) if node["feature_type"] == FEATURE else None
    return None if folder is None else f"{quote(str(folder).rstrip('/'))}/latent-{latent(node)}.html"


def _attr(text) -> str:
    return html.escape(str(text), quote=True)


def _shape(kind: str, x: float, y: float) -> str:
    if kind == FEATURE:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5"/>'
    if kind == ERROR:
        return f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9"/>'
    points = ([(x, y - 6.5), (x + 6.5, y), (x, y + 6.5), (x - 6.5, y)] if kind == EMBEDDING
              else [(x, y - 6.5), (x + 6, y + 5), (x - 6, y + 5)])  # embeddings: diamonds; logits: triangles
    return f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in points)}"/>'


def _svg(doc: dict, lay: Layout, summary: dict | None, dashboards: dict[int, str] | None) -> str:
    parts = [f'<line class="grid" x1="{LEFT}" y1="{y + ROW / 2:.1f}" x2="{lay.width:.1f}" y2="{y + ROW / 2:.1f}"/>'
             f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{label}</text>' for y, label in lay.rows]
    base = lay.height - BOTTOM
    for pos, (x, w) in enumerate(zip(lay.columns, lay.widths)):
        parts.append(f'<line class="grid" x1="{x - w / 2:.1f}" y1="{TOP}" x2="{x - w / 2:.1f}" y2="{base}"/>'
                     f'<text class="token" x="{x:.1f}" y="{base + 16}" text-anchor="middle">'
                     f'{html.escape(visible(lay.tokens[pos], int(w // 7.5)))}<title>{pos}: {html.escape(repr(lay.tokens[pos]))}</title></text>'
                     f'<text x="{x:.1f}" y="{base + 31}" text-anchor="middle">{pos}</text>')
    # A browser stays quick with some thousands of SVG lines, not 100,000s.
    links = strongest([k for k in doc["links"] if k["source"] in lay.xy and k["target"] in lay.xy], MAX_PAGE_LINKS)
    top = max((abs(k["weight"]) for k in links if finite(k["weight"])), default=0.0)
    for k in links:  # weakest first, so the strongest are drawn on top
        (x1, y1), (x2, y2), w = lay.xy[k["source"]], lay.xy[k["target"]], k["weight"]
        s = min(1.0, abs(w) / top) if top > 0 and finite(w) else 0.0
        parts.append(f'<line class="edge {"neg" if w < 0 else "pos"}" data-source="{_attr(k["source"])}" data-target="{_attr(k["target"])}" '
                     f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke-width="{0.5 + 2.5 * s:.2f}" '
                     f'stroke-opacity="{0.12 + 0.78 * s:.3f}"><title>{html.escape(k["source"] + " → " + k["target"])}: '
                     f'weight {num(w)}</title></line>')
    for node in doc["nodes"]:
        (x, y), kind = lay.xy[node["node_id"]], node["feature_type"]
        cls = f'node {KINDS.get(kind, "other")}{" target" if node.get("is_target_logit") else ""}'
        g = (f'<g class="{cls}" data-node="{_attr(node["node_id"])}">{_shape(kind, x, y)}'
             f'<title>{html.escape(describe(node, lay.tokens, summary))}</title></g>')
        href = latent_href(node, dashboards)
        parts.append(f'<a href="{_attr(href)}">{g}</a>' if href else g)
    return (f'<div class="graph-wrap"><svg class="graph" viewBox="0 0 {lay.width:.0f} {lay.height:.0f}" width="{lay.width:.0f}" '
            f'height="{lay.height:.0f}" role="img" aria-label="attribution graph">{"".join(parts)}</svg></div>')


def _table(doc: dict, lay: Layout, summary: dict | None, dashboards: dict[int, str] | None) -> str:
    # `influence` is circuit-tracer's running share: the share of the total influence of the nodes
    # at least as influential as this one, so the smallest is the most influential.
    rows = []
    for node in sorted(doc["nodes"], key=lambda n: (n.get("influence") if finite(n.get("influence")) else float("inf"))):
        kind, pos, lat = node["feature_type"], int(node["ctx_idx"]), latent(node)
        href = latent_href(node, dashboards)
        lat_html = "" if lat is None else f'<a href="{_attr(href)}">{lat}</a>' if href else str(lat)
        layer = {EMBEDDING: "emb", LOGIT: "logit"}.get(kind, html.escape(str(node["layer"])))
        shown = logit_token(node, summary) if kind == LOGIT else lay.tokens[pos] if pos < len(lay.tokens) else None
        token = "" if shown is None else f'<span class="tok">{tok(shown)}</span>'
        act = f'p = {num(node.get("token_prob"), 3)}' if kind == LOGIT else num(node.get("activation"))
        rows.append(f'<tr data-node="{_attr(node["node_id"])}"><td>{KINDS.get(kind, html.escape(kind))}</td><td>{layer}</td>'
                    f'<td class="num">{pos}</td><td class="line">{token}</td><td class="num">{lat_html}</td>'
                    f'<td class="num">{act}</td><td class="num">{num(node.get("influence"))}</td>'
                    f'<td>{html.escape(str(node.get("clerp") or "")) if kind != LOGIT else ""}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("type", "layer", "position", "token", "latent", "activation", "influence", "label"))
    return (f'<p class="note">Most influential first. Influence: the share of the total influence on the logits of the nodes at '
            f'least as influential as this one (circuit-tracer\'s cumulative influence). A logit\'s token is the one '
            f'it predicts, its activation column its probability.</p>'
            f'<table id="nodes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _transcoders(names: list) -> str:
    """The transcoders' hooks, the first and last only when there are many (one per layer)."""
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 4 else f"{len(names)}: {names[0]}, ..., {names[-1]}"


def _header(doc: dict, lay: Layout, summary: dict | None) -> str:
    meta, summary = doc["metadata"], summary or {}
    prompt = (f'<div class="line">{"".join(f"<span class=tok>{tok(t)}</span>" for t in lay.tokens)}</div>' if lay.tokens
              else f'<p>{html.escape(str(meta.get("prompt", "")))}</p>')
    info = {"model": summary.get("model"), "graph": f'{meta.get("slug")} ({meta.get("scan")})',
            "transcoders": _transcoders(meta.get("transcoder_list") or []),
            "replacement score": num(summary.get("replacement_score"), 3),
            "completeness score": num(summary.get("completeness_score"), 3),
            "kept": f'{len(doc["nodes"]):,} nodes, {len(doc["links"]):,} links (node threshold {num(meta.get("node_threshold"), 3)})'
                    + (f'; the strongest {MAX_PAGE_LINKS:,} links drawn (all are in graph.json)' if len(doc["links"]) > MAX_PAGE_LINKS else "")}
    dl = "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info.items() if v is not None)
    items = "".join(f'<li><span class="tok">{tok(t)}</span> <span class="val">{"<b>" if target else ""}p = {num(p, 3)}'
                    f'{" (target)</b>" if target else ""}</span></li>' for t, p, target in logits(doc, summary))
    key = "".join(f'<span><span class="swatch" style="background:{c}"></span>{name}</span>' for name, c in (
        *((KINDS[k], c) for k, c in COLOURS.items()), ("positive link", f"rgb({BLUE})"), ("negative link", f"rgb({RED})")))
    return (f'<h1>Attribution graph</h1>{prompt}<dl class="run">{dl}</dl><h2>Logits</h2><ol class="toklist">{items}</ol>'
            f'<h2>Graph</h2><p class="note">Hover a node to bring out its links, click to keep them; a feature with a '
            f'dashboard opens its latent page.</p><div class="key note">{key}</div>')


def graph_page(doc: dict, *, summary: dict | None = None, dashboards: dict[int, str] | None = None) -> str:
    """The page's HTML (see the module docstring)."""
    lay = graph_layout(doc)
    title = f'Attribution graph · {visible(doc["metadata"].get("prompt", ""), 60)}'
    body = _header(doc, lay, summary) + _svg(doc, lay, summary, dashboards) + "<h2>Nodes</h2>" + _table(doc, lay, summary, dashboards)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f'<title>{html.escape(title)}</title><style>{CSS}{GRAPH_CSS}</style></head>\n<body>{body}{SCRIPT}</body></html>\n')


def write_graph_page(doc: dict, path: str | Path, *, summary: dict | None = None,
                     dashboards: dict[int, str] | None = None) -> Path:
    """Write the graph `doc` (`graph_json`'s) as one HTML page at `path`, atomically; returns `path`.

    `summary` (build_graph's summary.json) adds the model, scores and logits' tokens; `dashboards`
    maps a layer to its dashboard folder, relative to the page, so its features link to their latents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = graph_page(doc, summary=summary, dashboards=dashboards)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
