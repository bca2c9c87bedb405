"""The pieces every dashboard page is built from: tokens made visible and safe, numbers, shaded
token spans, and the colours they use (plain HTML; the CSS is the dashboard's)."""

from __future__ import annotations

import html
import math
import re

ORANGE, RED, BLUE = "255,128,0", "220,38,38", "37,99,235"
WHITESPACE = {"\r": "␍", "\n": "↵", "\t": "⇥", " ": "·"}
MISSING = '<p class="missing">not computed</p>'
MAXIMIZE_NOTE = ("These are inputs that maximize the latent, found by search rather than read from the corpus: "
                 "corpus dashboards do not show them, and they may fire it far above anything in the corpus.")


def tok(t) -> str:
    """A token made visible and safe: HTML-escaped, then whitespace drawn faintly (↵ newline, ⇥ tab, · space)."""
    text = re.sub(r"[\r\n\t ]", lambda m: f'<span class="ws">{WHITESPACE[m[0]]}</span>', html.escape(str(t)))
    return text or '<span class="ws">∅</span>'


def num(x, digits: int = 4) -> str:
    """A number as the pages print it: ints with thousands separators, floats to `digits` significant digits."""
    if x is None:
        return "–"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return html.escape(str(x))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def span(token, colour: str, alpha: float, title: str, cls: str = "") -> str:
    """One token shaded in `colour` at opacity `alpha`, with `title` on hover."""
    style = f' style="background:rgba({colour},{alpha:.3f})"' if alpha > 0 else ""
    return f'<span class="tok{" " + cls if cls else ""}"{style} title="{html.escape(title)}">{tok(token)}</span>'


def strength(value, scale) -> float:
    """Shading opacity: |value| / scale, at most 1 (0 when either is not a finite number)."""
    return min(1.0, abs(value) / scale) if finite(value) and finite(scale) and scale > 0 else 0.0
