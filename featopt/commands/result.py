"""What every command returns: a result object that prints the command line's table, and shows it
(and the pictures beside it) when a notebook displays it."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from featopt.results import FeatureResult


class CommandResult:
    """Base of every command's result: `out` is the folder it wrote, `table()` the text the command
    line prints, `str(result)` the same, and `_repr_html_` the table and the run's PNGs for Jupyter."""

    out: Path
    #: the file the command line names after the table ("results: ..."); default: the folder
    record_name: str | None = None
    #: the command printed its own report as it ran (the demo): the command line adds only the folder
    printed: bool = False

    def table(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.table()

    @property
    def path(self) -> Path:
        return self.out / self.record_name if self.record_name else self.out

    @property
    def rank_zero(self) -> bool:
        """Whether this process reports (the others of a multi-process run return quietly)."""
        trainer = getattr(self, "trainer", None)
        return trainer is None or trainer.is_global_zero

    def images(self) -> list[Path]:
        """The PNGs the run wrote at the top of its folder, for display."""
        return sorted(self.out.glob("*.png")) if self.out and Path(self.out).is_dir() else []

    def _repr_html_(self) -> str:
        parts = [f"<pre style='font-size:12px'>{html.escape(self.table())}</pre>"]
        for png in self.images():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<div><img alt='{html.escape(png.name)}' src='data:image/png;base64,{data}' "
                         "style='max-width:100%'></div>")
        parts.append(f"<div style='color:#666;font-size:11px'>results: {html.escape(str(self.path))}</div>")
        return "\n".join(parts)


@dataclass
class SearchRun(CommandResult):
    """The records of a search or a gradient run, one per problem (site-major), and its folder."""

    results: list[FeatureResult]
    out: Path
    trainer: object = field(default=None, repr=False)
    module: object = field(default=None, repr=False)

    def table(self) -> str:
        from featopt.commands.tables import feature_table

        return feature_table(self.results)
