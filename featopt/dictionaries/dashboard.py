"""A static feature dashboard for SAE latents: plain HTML, CSS and inline SVG that opens from file://.

:func:`write_dashboard` writes `index.html` (the run, and one row per latent), `latent-<i>.html`
(one page per latent: activation histogram, top examples, the searched inputs that fire the latent
beside them (the most active and the most active fluent one shaded by activation, the front of
activation against fluency as an SVG, a marker where an input beats every corpus example), uniform
examples, logit lens, ablated text, direction ablation and the best single tokens), `style.css` and
`dashboard.json` (the run and each latent's frequency and max; it marks the folder as a featopt
dashboard, which a later call may replace). Nothing is fetched from anywhere. Every token and text
is HTML-escaped, newlines show as ↵ and spaces as a faint ·. A section whose data is missing (the
key absent or None) says "not computed".

The site is built in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written dashboard; an old dashboard at `out` is replaced, any other non-empty folder refused.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from featopt.dictionaries.inputs_page import inputs_section
from featopt.dictionaries.page_parts import BLUE, MISSING, ORANGE, RED, finite as _finite, num as _num, span as _span
from featopt.dictionaries.page_parts import strength as _strength, tok as _tok
from featopt.errors import FeatoptError
from featopt.results import atomic_folder

MARKER = "dashboard.json"
SCRIPT = ('<script>document.addEventListener("keydown", e => { const rel = {ArrowLeft: "prev", ArrowRight: "next"}[e.key];'
          ' const a = rel && document.querySelector(`a[rel="${rel}"]`); if (a) location.href = a.href; });</script>')
SORT_SCRIPT = ('<script>document.querySelectorAll("button.sort").forEach(b => b.addEventListener("click", () => {'
               ' const k = +b.dataset.column, body = document.querySelector("#latents tbody");'
               ' const down = b.dataset.order !== "desc"; b.dataset.order = down ? "desc" : "asc";'
               ' const value = r => { const v = r.children[k].dataset.value; return v === "" ? -Infinity : +v; };'
               ' [...body.rows].sort((a, c) => down ? value(c) - value(a) : value(a) - value(c))'
               '.forEach(r => body.appendChild(r)); }));</script>')
CSS = """\
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.5em; margin: .3em 0; } h2 { font-size: 1.15em; margin: 1.6em 0 .5em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: .95em; margin: .9em 0 .2em; }
nav { display: flex; gap: 1.5em; font-size: .95em; } a { color: #0550ae; }
.stats, .meta, .note { color: #57606a; } .meta { font-size: .85em; margin-bottom: .15em; }
.missing { color: #8c959f; font-style: italic; }
table { border-collapse: collapse; } th, td:first-child { white-space: nowrap; } th, td { padding: .25em .7em; border-bottom: 1px solid #eaeef2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } dl.run { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; }
dl.run dt { font-weight: 600; } dl.run dd { margin: 0; word-break: break-all; }
.example { margin: .55em 0; } .line { font: 14px/1.9 ui-monospace, SFMono-Regular, Menlo, monospace; }
.tok { white-space: pre; border-radius: 2px; padding: 1px 0; display: inline-block; min-width: .4em; }
.line .tok { margin-right: 1px; } .tok.target { outline: 2px solid #1f2328; outline-offset: -1px; }
.tok.after { color: #8c959f; } .ws { color: #8c959f; }
.toklist { display: flex; flex-wrap: wrap; gap: .3em .9em; padding-left: 0; list-style: none; margin: .3em 0; }
.toklist .tok { background: #f3f4f6; font-family: ui-monospace, monospace; padding: 0 .25em; }
.val { color: #57606a; font-size: .85em; } .cols { display: flex; gap: 3em; flex-wrap: wrap; } .cols > div { flex: 1 1 20em; }
svg.hist rect { fill: rgb(255,128,0); } svg.hist text { font: 11px system-ui, sans-serif; fill: #57606a; }
svg.hist line { stroke: #57606a; }
svg.front text { font: 11px system-ui, sans-serif; fill: #57606a; } svg.front line { stroke: #57606a; }
svg.front line.corpus-max { stroke: rgb(220,38,38); stroke-dasharray: 5 3; } svg.front line.threshold { stroke: #1a7f37; stroke-dasharray: 2 3; }
svg.front polyline.front { fill: none; stroke: rgb(37,99,235); stroke-width: 1.5; } svg.front circle.point { fill: rgb(37,99,235); }
svg.front circle.window { fill: #8c959f; } .beats { color: #9a6700; font-weight: 600; margin-left: .4em; }
button.sort { font: inherit; font-weight: 600; border: none; background: none; padding: 0; cursor: pointer; color: #0550ae; }
"""


def _example(ex: dict, kind: str, scale: float, k: int, extra: str = "") -> str:
    """One example: its tokens shaded by activation / the latent's max, the example token outlined."""
    tokens, acts, target = ex.get("tokens") or [], ex.get("acts") or [], ex.get("target")
    spans = []
    for j, t in enumerate(tokens):
        a = acts[j] if j < len(acts) else None
        alpha = _strength(a, scale) if _finite(a) and a > 0 else 0.0
        spans.append(_span(t, ORANGE, alpha, f"{t!r}: activation {_num(a)}", "target" if j == target else ""))
    meta = [f"activation <b>{_num(ex.get('activation'))}</b>", extra,
            f"document {html.escape(str(ex['document']))}" if ex.get("document") is not None else "",
            f"position {_num(ex.get('position'))}" if ex.get("position") is not None else "",
            f"context {_num(ex.get('context'))}, index {_num(ex.get('index'))}" if ex.get("context") is not None else ""]
    return (f'<div class="example" data-kind="{kind}" id="{kind}-{k}"><div class="meta">{" · ".join(m for m in meta if m)}'
            f'</div><div class="line">{"".join(spans)}</div></div>')


def _toklist(pairs) -> str:
    items = "".join(f'<li><span class="tok">{_tok(p[0])}</span> <span class="val">{_num(p[1])}</span></li>'
                    if isinstance(p, (list, tuple)) else f'<li><span class="tok">{_tok(p)}</span></li>' for p in pairs or [])
    return f'<ol class="toklist">{items}</ol>' if items else MISSING


def _histogram(h: dict | None) -> str | None:
    counts, width = (h or {}).get("counts"), (h or {}).get("bin_width")
    if not counts or not _finite(width):
        return None
    W, H, left, bottom = 680, 190, 56, 40
    top, bw = max(max(counts), 1), (W - left - 12) / len(counts)
    base = H - bottom
    parts = [f'<line x1="{left}" y1="{base}" x2="{W - 8}" y2="{base}"/><line x1="{left}" y1="8" x2="{left}" y2="{base}"/>',
             f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text><text x="{left - 6}" y="{base}" text-anchor="end">0</text>',
             f'<text x="{(left + W) / 2}" y="{H - 4}" text-anchor="middle">activation</text>',
             f'<text x="14" y="{base / 2}" text-anchor="middle" transform="rotate(-90 14 {base / 2})">tokens</text>']
    for i, c in enumerate(counts):
        bar = (base - 10) * c / top
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{base - bar:.1f}" width="{max(bw - 1, .5):.1f}" height="{bar:.1f}">'
                     f'<title>[{_num(i * width)}, {_num((i + 1) * width)}): {c:,}</title></rect>')
    step = max(1, math.ceil(len(counts) / 12))
    parts += [f'<text x="{left + i * bw:.1f}" y="{base + 15}" text-anchor="middle">{_num(i * width, 3)}</text>'
              for i in range(0, len(counts) + 1, step)]
    return (f'<svg class="hist" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="histogram of the latent\'s nonzero activations">{"".join(parts)}</svg>')


def _logit_lens(lens: dict | None) -> str | None:
    if not lens:
        return None
    return (f'<p class="note">the decoder direction through the unembedding (norm: {html.escape(str(lens.get("norm")))})</p>'
            f'<div class="cols"><div><h3>top</h3>{_toklist(lens.get("top"))}</div><div><h3>bottom</h3>{_toklist(lens.get("bottom"))}</div></div>'
            f'<h3>removed high-norm tokens</h3>{_toklist(lens.get("removed"))}')


def _ablated_text(items: list | None) -> str | None:
    if not items:
        return None
    out = ['<p class="note">red: removing the token lowers the latent at the outlined token; blue: raises it.</p>']
    for it in items:
        tokens, target, change, rel = it.get("tokens") or [], it.get("target"), it.get("change") or [], it.get("relative") or []
        first = it.get("first") if isinstance(it.get("first"), int) else 0  # 1 with --bos: the BOS token, never removed; change[j] is token first + j's
        scale = max((abs(c) for c in change if _finite(c)), default=0.0)
        spans = []
        for j, t in enumerate(tokens):
            if j < first:
                spans.append(_span(t, "", 0, f"{t!r}: the BOS token, kept"))
            elif j - first < len(change):
                c, r = change[j - first], rel[j - first] if j - first < len(rel) else None
                alpha = min(1.0, abs(r)) if _finite(r) else _strength(c, scale)
                note = f" ({r:+.1%})" if _finite(r) else ""
                spans.append(_span(t, RED if _finite(c) and c < 0 else BLUE, alpha, f"{t!r}: removing it changes the latent by {_num(c)}{note}"))
            else:
                spans.append(_span(t, ORANGE, 0, f"{t!r}: activation {_num(it.get('base'))}" if j == target else f"{t!r}",
                                   "target" if j == target else "after"))
        k = it.get("example")
        out.append(f'<div class="example" data-kind="ablated"><div class="meta"><a href="#top-{html.escape(str(k))}">top example {_num(k)}</a>'
                   f' · activation {_num(it.get("base"))}</div><div class="line">{"".join(spans)}</div></div>')
    return "".join(out)


def _direction_ablation(d: dict | None) -> str | None:
    if not d:
        return None
    out = [f'<p class="note">mode: {html.escape(str(d.get("mode")))}; each token coloured by the change of its log-prob '
           'when the direction is ablated (red: less likely, blue: more likely).</p>']
    for ex in d.get("examples") or []:
        tokens, delta = ex.get("tokens") or [], ex.get("delta") or []
        scale = max((abs(x) for x in delta if _finite(x)), default=0.0)
        spans = [_span(t, "", 0, repr(t)) if j == 0 or j - 1 >= len(delta) else
                 _span(t, RED if _finite(delta[j - 1]) and delta[j - 1] < 0 else BLUE, _strength(delta[j - 1], scale),
                       f"{t!r}: log-prob changes by {_num(delta[j - 1])}") for j, t in enumerate(tokens)]
        out.append(f'<div class="example" data-kind="direction"><div class="meta">top example {_num(ex.get("example"))}</div>'
                   f'<div class="line">{"".join(spans)}</div></div>')
    out.append(f'<div class="cols"><div><h3>decreased most</h3>{_toklist(d.get("decreased"))}</div>'
               f'<div><h3>increased most</h3>{_toklist(d.get("increased"))}</div></div>')
    return "".join(out)


def _max_inputs(m: dict | None) -> str | None:
    if not m:
        return None
    return (f'<p class="note">Every vocabulary token as a one-token input after the prefix, best first (one exhaustive '
            f'sweep).</p>{_toklist(m.get("exhaustive"))}')


def _section(title: str, body: str | None) -> str:
    return f'<section><h2>{title}</h2>{MISSING if body is None else body}</section>'


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f'<title>{html.escape(title)}</title><link rel="stylesheet" href="style.css"></head>\n<body>{body}{SCRIPT}</body></html>\n')


def _value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_value, v))
    return _num(v) if isinstance(v, int) and not isinstance(v, bool) else html.escape(str(v))


def _latent_page(rec: dict, prev: int | None, nxt: int | None, model: str) -> str:
    i = rec["latent"]
    top, uniform = rec.get("top_examples"), rec.get("uniform_examples")
    scale = rec.get("max") if _finite(rec.get("max")) and rec["max"] > 0 else max(
        (a for ex in (top or []) + (uniform or []) for a in ex.get("acts") or [] if _finite(a)), default=1.0)
    nav = ['<a href="index.html">all latents</a>',
           f'<a rel="prev" href="latent-{prev}.html">← latent {prev}</a>' if prev is not None else "",
           f'<a rel="next" href="latent-{nxt}.html">latent {nxt} →</a>' if nxt is not None else ""]
    stats = (f'fires on {_num(rec.get("fires"))} of {_num(rec.get("tokens"))} tokens · frequency {_num(rec.get("frequency"), 3)}'
             f' · max {_num(rec.get("max"))} · mean when active {_num(rec.get("mean_when_active"))}')
    top_html = "".join(_example(ex, "top", scale, k) for k, ex in enumerate(top)) if top else None
    uniform_html = "".join(_example(ex, "uniform", scale, k, f"bin [{_num((ex.get('bin') or [None, None])[0])}, "
                                    f"{_num((ex.get('bin') or [None, None])[-1])}) of {_num(ex.get('count'))}")
                           for k, ex in enumerate(uniform)) if uniform else None
    body = (f'<nav>{"".join(nav)}</nav><h1>Latent {i}</h1><p class="stats">{html.escape(model)}<br>{stats}</p>'
            + _section("Activation histogram", _histogram(rec.get("histogram")))
            + _section("Inputs that fire the latent", inputs_section(rec.get("inputs")))
            + _section("Top examples", top_html)
            + _section("Uniform examples", uniform_html)
            + _section("Logit lens", _logit_lens(rec.get("logit_lens")))
            + _section("Ablated text", _ablated_text(rec.get("ablated_text")))
            + _section("Direction ablation", _direction_ablation(rec.get("direction_ablation")))
            + _section("Best single tokens", _max_inputs(rec.get("max_inputs"))))
    return _page(f"Latent {i} · featopt", body)


def _index_page(run: dict, latents: list[dict]) -> str:
    info = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{_value(v)}</dd>" for k, v in run.items())
    rows = []
    for rec in latents:
        i, lens = rec["latent"], rec.get("logit_lens") or {}
        tokens = _toklist((lens.get("top") or [])[:6]) if lens.get("top") else MISSING
        found = rec.get("inputs") or {}
        cells = [(i, f'<a href="latent-{i}.html">latent {i}</a>', ""), (rec.get("frequency"), _num(rec.get("frequency"), 3), "num"),
                 (rec.get("max"), _num(rec.get("max")), "num"), (rec.get("mean_when_active"), _num(rec.get("mean_when_active")), "num"),
                 (found.get("best_ratio"), _num(found.get("best_ratio"), 3), "num best-ratio"),
                 (found.get("best_fluent_ratio"), _num(found.get("best_fluent_ratio"), 3), "num fluent-ratio")]
        tds = "".join(f'<td class="{cls}" data-value="{float(v) if _finite(v) else ""}">{text}</td>' for v, text, cls in cells)
        rows.append(f'<tr class="latent-row" data-latent="{i}">{tds}<td>{tokens}</td></tr>')
    heads = ["latent", "frequency", "max", "mean when active", "best input / max", "best fluent / max"]
    th = "".join(f'<th><button class="sort" data-column="{k}" title="sort by {h}">{h}</button></th>' for k, h in enumerate(heads))
    body = (f'<h1>SAE latents</h1><dl class="run">{info}</dl><h2>{len(latents)} latents</h2>'
            '<p class="note">Click a column to sort by it (again: the other way). Best input / max: the most active searched '
            'input over the latent\'s corpus maximum; best fluent / max: the same for inputs at least as fluent as its '
            f'corpus text.</p><table id="latents"><thead><tr>{th}<th>top logit-lens tokens</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{SORT_SCRIPT}')
    return _page("SAE latents · featopt", body)


def write_dashboard(out: str | Path, run: dict, latents: list[dict]) -> Path:
    """Write the static dashboard of `latents` to the folder `out`, atomically; returns `out`.

    `run` describes where the latents come from (model, sae path and hash, corpus, tokens, seed,
    ...); the library versions are added unless it holds `versions`. Each record in `latents` holds
    `latent` (its index) and any of `tokens`, `fires`, `frequency`, `max`, `mean_when_active`,
    `histogram`, `top_examples`, `uniform_examples`, `logit_lens`, `ablated_text`,
    `direction_ablation`, `inputs` (a `featopt sae inputs` record) and `max_inputs` (the schema is the one the SAE analysis writes; see the
    module docstring). `out` may be new, empty or an old dashboard, which is replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatoptError(f"{out} is a file, not a folder: give a new folder or an old dashboard to replace.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FeatoptError(f"{out} exists and is not a featopt dashboard (no {MARKER}): "
                           "give a new folder or an old dashboard to replace.")
    indices = [rec.get("latent") if isinstance(rec, dict) else None for rec in latents]
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad or len(set(indices)) != len(indices):
        raise FeatoptError(f"every latent record needs its own 'latent' index, a non-negative int; got {indices[:20]}.")
    if "versions" not in run:
        from featopt.results import versions

        run = {**run, "versions": versions()}
    model = " · ".join(_value(run[k]) for k in ("model", "site", "hook_name") if run.get(k) is not None)
    marker = {"format": "featopt-dashboard", "version": 1, "run": run,
              "latents": [{"latent": r["latent"], "frequency": r.get("frequency"), "max": r.get("max"),
                           "page": f"latent-{r['latent']}.html"} for r in latents]}

    with atomic_folder(out) as tmp:
        (tmp / "style.css").write_text(CSS, encoding="utf-8")
        for k, rec in enumerate(latents):
            prev, nxt = (indices[k - 1] if k > 0 else None), (indices[k + 1] if k + 1 < len(indices) else None)
            (tmp / f"latent-{rec['latent']}.html").write_text(_latent_page(rec, prev, nxt, model), encoding="utf-8")
        (tmp / "index.html").write_text(_index_page(run, latents), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return out
