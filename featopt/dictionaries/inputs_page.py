"""The dashboard's section on searched inputs (`featopt sae inputs`' record of a latent): the most
active input and the most active fluent one, shaded by the latent's activation at each token and
marked where they reach the corpus maximum, and the front of activation against fluency as an
inline SVG beside the corpus windows, the corpus max and the fluency threshold."""

from __future__ import annotations

import html

from featopt.dictionaries.page_parts import MAXIMIZE_NOTE, MISSING, ORANGE, finite, num, span, strength


def input_line(q: dict | None, kind: str, label: str, corpus_max) -> str:
    """A searched input: its tokens shaded by the latent's activation at each (prefix included,
    faint), the last token outlined, and a marker when it reaches the corpus maximum."""
    if not q:
        return f'<h3>{label}</h3>{MISSING}'
    tokens, acts = q.get("tokens") or [], q.get("acts") or []
    scale = max([a for a in acts if finite(a)] + ([corpus_max] if finite(corpus_max) else []), default=1.0)
    spans = [span(t, ORANGE, strength(acts[j], scale) if j < len(acts) and finite(acts[j]) and acts[j] > 0 else 0.0,
                   f"{t!r}: activation {num(acts[j] if j < len(acts) else None)}", "target" if j == len(tokens) - 1 else "")
             for j, t in enumerate(tokens)]
    beats = finite(q.get("activation")) and finite(corpus_max) and corpus_max > 0 and q["activation"] >= corpus_max
    marker = '<span class="beats" title="at least every corpus example">★ beats every corpus example</span>' if beats else ""
    meta = (f'activation <b>{num(q.get("activation"))}</b> · {num(q.get("ratio"), 3)} × corpus max · xent '
            f'{num(q.get("xent"), 3)} nats/token {marker}')
    return (f'<h3>{label}</h3><div class="example" data-kind="{kind}" data-beats="{str(bool(beats)).lower()}">'
            f'<div class="meta">{meta}</div><div class="line">{"".join(spans)}</div></div>')


def front_svg(r: dict) -> str | None:
    """The front (activation against xent, re-measured), the corpus windows as inputs, the corpus
    max (dashed) and the fluency threshold (dotted), as an inline SVG."""
    front = [q for q in r.get("front") or [] if finite(q.get("xent")) and finite(q.get("activation"))]
    xs_w, ys_w = r.get("corpus_window_xent") or [], r.get("corpus_window_alone") or []
    windows = [(x, y) for x, y in zip(xs_w, ys_w) if finite(x) and finite(y)]
    if not front:
        return None
    top, threshold = r.get("corpus_max"), r.get("fluency_threshold")
    xs = [q["xent"] for q in front] + [x for x, _ in windows] + ([threshold] if finite(threshold) else [])
    ys = [q["activation"] for q in front] + [y for _, y in windows] + ([top] if finite(top) else []) + [0.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    W, H, left, bottom, pad = 680, 230, 56, 40, 12

    def px(x):
        return left + (x - x0) / (x1 - x0) * (W - left - pad)

    def py(y):
        return H - bottom - (y - y0) / (y1 - y0) * (H - bottom - pad)

    base = H - bottom
    parts = [f'<line x1="{left}" y1="{base}" x2="{W - 8}" y2="{base}"/><line x1="{left}" y1="8" x2="{left}" y2="{base}"/>',
             f'<text x="{(left + W) / 2}" y="{H - 4}" text-anchor="middle">xent of the input (nats/token)</text>',
             f'<text x="14" y="{base / 2}" text-anchor="middle" transform="rotate(-90 14 {base / 2})">activation</text>',
             f'<text x="{left - 6}" y="{py(y1) + 4:.1f}" text-anchor="end">{num(y1, 3)}</text>',
             f'<text x="{left - 6}" y="{py(y0) + 4:.1f}" text-anchor="end">{num(y0, 3)}</text>',
             f'<text x="{left}" y="{base + 15}" text-anchor="middle">{num(x0, 3)}</text>',
             f'<text x="{W - pad}" y="{base + 15}" text-anchor="middle">{num(x1, 3)}</text>']
    if finite(top) and top > 0:
        parts.append(f'<line class="corpus-max" x1="{left}" y1="{py(top):.1f}" x2="{W - pad}" y2="{py(top):.1f}">'
                     f'<title>corpus max {num(top)}</title></line>'
                     f'<text class="label" x="{W - pad}" y="{py(top) - 4:.1f}" text-anchor="end">corpus max</text>')
    if finite(threshold):
        parts.append(f'<line class="threshold" x1="{px(threshold):.1f}" y1="8" x2="{px(threshold):.1f}" y2="{base}">'
                     f'<title>fluency threshold {num(threshold)} (median xent of the corpus windows)</title></line>')
    for x, y in windows:
        parts.append(f'<circle class="window" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"><title>corpus window: xent {num(x)}, '
                     f'activation {num(y)}</title></circle>')
    ordered = sorted(front, key=lambda q: q["xent"])
    parts.append('<polyline class="front" points="' + " ".join(f"{px(q['xent']):.1f},{py(q['activation']):.1f}" for q in ordered)
                 + '"/>')
    for q in ordered:
        parts.append(f'<circle class="point" cx="{px(q["xent"]):.1f}" cy="{py(q["activation"]):.1f}" r="3.5"><title>'
                     f'{html.escape(repr(q.get("text")))}: activation {num(q["activation"])}, xent {num(q["xent"])}'
                     '</title></circle>')
    return (f'<svg class="front" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="Pareto front of activation against cross-entropy">{"".join(parts)}</svg>')


def inputs_section(r: dict | None) -> str | None:
    if not r:
        return None
    top = r.get("corpus_max")
    stats = (f'corpus max {num(top)} · best {num(r.get("best_ratio"), 3)} × · best fluent '
             f'{num(r.get("best_fluent_ratio"), 3)} × · fluency threshold {num(r.get("fluency_threshold"), 3)} nats/token '
             f'(the median over {num(r.get("corpus_windows"))} corpus windows) · {num(r.get("forward_evaluations"))} '
             f'inputs scored, {num(r.get("steps"))} steps')
    svg = front_svg(r)
    return (f'<p class="note">{MAXIMIZE_NOTE} Fluent: the model\'s cross-entropy of the input is at most the median of '
            f'the latent\'s top corpus windows of the same length.</p><p class="stats">{stats}</p>'
            + input_line(r.get("best"), "best-input", "most active input", top)
            + input_line(r.get("best_fluent"), "best-fluent-input", "most active fluent input", top)
            + f'<h3>front: activation against fluency</h3>{svg or MISSING}')
