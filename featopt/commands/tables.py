"""The tables the commands print: the source documents' table of found inputs (one row per site,
one column per feature problem), and the one-line-per-problem form of the gradient runs."""

from __future__ import annotations

from featopt.results import FeatureResult


def feature_table(results: list[FeatureResult], *, activations: bool = True) -> str:
    """One row per site (per method too when several), one column per feature problem; each cell
    the found text after any fixed prefix and its re-measured activation."""
    specs = list(dict.fromkeys(r.spec for r in results))
    several = len({r.method for r in results}) > 1

    def label(r: FeatureResult) -> str:
        return f"{r.site} {r.method}" if several else r.site

    sites = list(dict.fromkeys(label(r) for r in results))
    cell = {(label(r), r.spec): r for r in results}

    def show(r: FeatureResult | None) -> str:
        if r is None:
            return ""
        skip = r.extra.get("prefix_length", 0)
        text = repr("".join(r.tokens[skip:]) if skip else r.text)
        return f"{text} {r.activation:.4g}" if activations else text

    rows = [[""] + specs] + [[site] + [show(cell.get((site, s))) for s in specs] for site in sites]
    return aligned(rows)


def aligned(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def problem_lines(results: list[FeatureResult]) -> str:
    """One line per problem, like the documents' gradient tables: spec, decoded text, activations."""
    width = max((len(r.spec) for r in results), default=0)
    lines = []
    for r in results:
        cont = f" (continuous {r.continuous_activation:.3g})" if r.continuous_activation is not None else ""
        lines.append(f"{r.spec:<{width}}  {r.text!r:<40}  activation {r.activation:.4g}{cont}")
    return "\n".join(lines)
