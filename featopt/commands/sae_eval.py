"""`featopt sae eval`: FVU, L0, dead fraction, CE loss recovered and KL divergence of SAEs (and
transcoders) on held-out text (:func:`featopt.dictionaries.evaluate.evaluate`), written to
`metrics.json`, with one latent density histogram per SAE beside it
(:func:`featopt.dictionaries.density.plot_density`); and the metrics table that `sae train` prints too."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from featopt.commands.fields import check_at_least, record_of
from featopt.commands.result import CommandResult
from featopt.commands.settings import ContextSettings, CorpusSettings, OutputSettings
from featopt.commands.loading import bos_id, check_context, load_plain
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.results import atomic_write, versions
from featopt.runs.outdir import out_folder


@dataclass
class EvalConfig(OutputSettings, CorpusSettings, ContextSettings):
    """Settings of `featopt sae eval`."""

    sae: str = ""
    """SAE folder(s) to evaluate, comma-separated (SAELens, sparsify or Gemma Scope)"""
    split: str = "eval"
    """eval (the held-out text), train or all"""
    contexts: int = 64
    """contexts to evaluate"""
    batch_contexts: int = 8
    """contexts per forward"""


@dataclass
class EvalRun(CommandResult):
    """Each SAE's metrics (in `--sae` order), its folder's name and its density histogram (PNG)."""

    metrics: list[dict]
    names: list[str]
    out: Path = field(default_factory=Path)
    plots: list[Path] = field(default_factory=list)

    def table(self) -> str:
        return metrics_table(self.metrics, self.names)


def evaluate(config: EvalConfig, adapter: ModelAdapter | None = None) -> EvalRun:
    """Evaluate every SAE of `config.sae` on `config.contexts` contexts of the corpus split; write
    `metrics.json` into `out`, and beside it each SAE's latent density histogram,
    `<SAE folder name>_density.png` (named in metrics.json as the SAE's `density_plot`)."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries.density import plot_density
    from featopt.dictionaries.evaluate import evaluate as evaluate_saes
    from featopt.models.sae.attach import attach
    from featopt.models.sae.formats import load_sae

    check_at_least(config, ["context_length", "contexts", "batch_contexts"])
    if config.skip_first < 0 or config.skip_first >= config.context_length:
        raise FeatoptError(f"--skip_first must be between 0 and {config.context_length - 1}, got {config.skip_first}.")
    if not config.sae:
        raise FeatoptError("--sae is required: give an SAE folder.")
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    dtype_of(config.dtype)
    paths = [p.strip() for p in config.sae.split(",") if p.strip()]
    saes = [load_sae(p) for p in paths]
    adapter = load_plain(config, adapter)
    for path, sae in zip(paths, saes):
        attach(adapter, sae, path)  # validates the site and its width
    check_context(adapter, config.context_length)
    contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                               eval_fraction=config.eval_fraction, bos=bos_id(adapter))[: config.contexts]
    metrics = evaluate_saes(adapter, saes, contexts, batch_size=config.batch_contexts, skip_first=config.skip_first,
                            progress=config.progress, frequency=True)
    out = out_folder(config.out)
    names = [Path(p).name for p in paths]
    plots = [out / file for file in _plot_names(names)]
    for name, path, row in zip(names, plots, metrics):
        plot_density(row.pop("firing_frequency"), path, title=f"latent density of {name}", tokens=row["tokens"])
    document = {"run": {"command": "sae eval", "config": record_of(config), "model": adapter.name, "versions": versions()},
                "saes": [{"path": p, "hash": s.content_hash(), "metrics": m, "density_plot": plot.name}
                         for p, s, m, plot in zip(paths, saes, metrics, plots)]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2)))
    return EvalRun(metrics, names, out, plots)


def _plot_names(names: Sequence[str]) -> list[str]:
    """`<name>_density.png` per SAE; a name given twice (folders of one name in different places)
    gets `-2`, `-3`, ... so no plot overwrites another."""
    files, seen = [], set()
    for name in names:
        stem, n = name or "sae", 1
        while (file := f"{stem}{f'-{n}' if n > 1 else ''}_density.png") in seen:
            n += 1
        seen.add(file)
        files.append(file)
    return files


# ----------------------------------------------------------------------------- the table
def _scalar(value) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)


def _cell(value) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    return "-"


def metrics_table(rows: Sequence[dict], names: Sequence[str]) -> str:
    """A plain-text table of :func:`featopt.dictionaries.evaluate.evaluate` rows: one line per
    metric, one column per SAE.

    Non-scalar entries (the firing frequencies) are left out; a metric a row lacks shows `-`.
    """
    from featopt.dictionaries.evaluate import METRIC_KEYS

    rows, names = list(rows), [str(n) for n in names]
    if len(rows) != len(names):
        raise FeatoptError(f"{len(rows)} rows of metrics but {len(names)} names: give one name per SAE.")
    keys = [k for k in METRIC_KEYS if any(k in row for row in rows)]
    keys += [k for row in rows for k in row if k not in keys and _scalar(row[k])]
    keys = list(dict.fromkeys(keys))
    table = [["metric", *names]] + [[k, *(_cell(row.get(k)) for row in rows)] for k in keys]
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    lines = []
    for n, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
