"""`featopt sae features|lens|mcs`: what latents mean (source document 002): corpus statistics of
every latent in one pass, the logit lens, and max cosine similarity between dictionaries. Each
writes a JSON record (and tensors where they are large) with the run's settings, the SAE's hash
and the versions, so a notebook gets the numbers the dashboard (`featopt sae dashboard`) shows.

Also the two helpers every command reading one SAE's latents shares: the model and the SAE,
checked to fit (:func:`load_model_and_sae`), and latents named in feature notation
(:func:`parse_latents`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, record_of
from featopt.commands.result import CommandResult
from featopt.commands.settings import ContextSettings, CorpusSettings, FolderSettings, ModelSettings, OutputSettings
from featopt.commands.loading import bos_id, check_context, load_plain
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.results import atomic_write, versions
from featopt.runs.outdir import out_folder
from featopt.specs import parse_features


# ----------------------------------------------------------------------------- shared
def load_model_and_sae(config, adapter: ModelAdapter | None = None):
    """`(adapter, sae)`: the config's model (or `adapter`, seen with the config's `--bos`) and the
    SAE at `config.sae`, checked to fit each other. The adapter is the plain model: the commands
    run the SAE on its activations themselves."""
    from featopt.models.sae.attach import attach
    from featopt.models.sae.formats import load_sae

    if not config.sae:
        raise FeatoptError("--sae is required: give an SAE folder (SAELens, sparsify or Gemma Scope).")
    dtype_of(config.dtype)
    sae = load_sae(config.sae)
    adapter = load_plain(config, adapter)
    attach(adapter, sae, config.sae)  # validates the site and its width
    return adapter, sae


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """Latents named in feature notation (`"[:, :, 0-49]"`, `"[:, :, 3,17]"`) or a bare list
    (`"0-49"`, `"3,17"`): one latent per problem, each below `d_sae`."""
    spec = str(spec).strip()
    if not spec.startswith("["):
        spec = f"[:, :, {spec}]" if "," not in spec else f"[:, :, [{spec}]]"
    problems = parse_features(spec, n_tokens=1, width=d_sae, site="the SAE")
    latents = []
    for problem in problems:
        if problem.features is None or len(problem.features) != 1:
            raise FeatoptError(f"--features {spec!r} selects latents together ({problem.spec}): name single latents, "
                               "like [:, :, 0-49] or [:, :, [3, 17]].")
        latents.append(int(problem.features[0]))
    return list(dict.fromkeys(latents))


def write_record(out: Path, name: str, document: dict) -> Path:
    """`document` as `out/name` (indented JSON, written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / name


def record_meta(command: str, config, adapter: ModelAdapter, sae) -> dict:
    """The `run` block of a record: the command, its settings, the model, the SAE, the versions."""
    return {"command": command, "config": record_of(config), "model": adapter.name, "sae": sae.describe(),
            "dtype": str(adapter.dtype).replace("torch.", ""), "versions": versions()}


# ----------------------------------------------------------------------------- features
@dataclass
class FeaturesConfig(OutputSettings, CorpusSettings, ContextSettings):
    """Settings of `featopt sae features`: statistics of every latent over a corpus, one pass."""

    sae: str = ""
    """the SAE folder"""
    tokens: int = 1_000_000
    """corpus tokens to read (at most)"""
    batch_contexts: int = 8
    """contexts per forward"""
    top_k: int = 20
    """top activating examples kept per latent"""
    n_bins: int = 10
    """equal-width activation bins, one uniform example sampled in each"""
    window_before: int = 24
    """tokens kept before each example"""
    window_after: int = 8
    """tokens kept after each example"""
    seed: int = 0
    """seed of the uniform examples"""
    out: str | None = None
    """output folder for features.safetensors and features.json (default featopt-runs/<time>)"""


@dataclass
class FeaturesRun(CommandResult):
    stats: object  # featopt.dictionaries.feature_stats.FeatureStats
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        stats = self.stats
        alive = int((stats.freq > 0).sum())
        order = torch.argsort(stats.freq, descending=True)[:5].tolist()
        lines = [f"{stats.tokens:,} tokens; {alive} of {len(stats.freq)} latents fired at least once",
                 "most frequent: " + ", ".join(f"{i} ({float(stats.freq[i]) / max(stats.tokens, 1):.2%})" for i in order)]
        return "\n".join(lines)


def _check_features(config: FeaturesConfig) -> None:
    check_at_least(config, ["tokens", "context_length", "batch_contexts", "top_k", "n_bins"])
    for name in ("window_before", "window_after"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 or more, got {getattr(config, name)}.")
    if not 0 <= config.skip_first < config.context_length:
        raise FeatoptError(f"--skip_first must be between 0 and {config.context_length - 1}, got {config.skip_first}.")
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")


def features(config: FeaturesConfig, adapter: ModelAdapter | None = None) -> FeaturesRun:
    """Stream up to `config.tokens` corpus tokens through the model and the SAE; keep, for every
    latent, its top examples, frequency, histogram and one uniform example per bin; write
    `features.safetensors` + `features.json` into `out`."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries.corpus_stats import corpus_stats

    _check_features(config)
    adapter, sae = load_model_and_sae(config, adapter)
    check_context(adapter, config.context_length)
    contexts, sources = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                                        eval_fraction=config.eval_fraction, max_tokens=config.tokens, with_sources=True,
                                        bos=bos_id(adapter))
    out = out_folder(config.out)
    stats = corpus_stats(adapter, sae, contexts, sources=sources, batch_contexts=config.batch_contexts,
                         top_k=config.top_k, n_bins=config.n_bins, window=(config.window_before, config.window_after),
                         seed=config.seed, skip_first=config.skip_first, progress=config.progress)
    stats.meta.update(record_meta("sae features", config, adapter, sae))
    stats.save(out)
    return FeaturesRun(stats, out)


# ----------------------------------------------------------------------------- lens
@dataclass
class LensConfig(FolderSettings, ModelSettings):
    """Settings of `featopt sae lens`: decoder directions through the unembedding."""

    sae: str = ""
    """the SAE folder"""
    features: str = "[:, :, 0-9]"
    """latents, e.g. "[:, :, 0-9]" or 3,17"""
    k: int = 10
    """top and bottom tokens"""
    norm: str = "weight"
    """none (raw LM head), weight (the final norm's gain) or apply (the final norm module)"""
    drop_z: float | None = 3.0
    """drop tokens whose unembedding-row norm has a z-score above this"""
    drop_top: int | None = None
    """or drop the n largest-norm tokens"""


@dataclass
class LensRun(CommandResult):
    records: list[dict]
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        lines = []
        for r in self.records:
            top = " ".join(repr(t) for t, _ in r["top"])
            bottom = " ".join(repr(t) for t, _ in r["bottom"])
            lines.append(f"latent {r['latent']}: top {top} | bottom {bottom}")
        if self.records:
            lines.append(f"removed high-norm tokens: {' '.join(repr(t) for t in self.records[0]['removed']) or '(none)'}")
        return "\n".join(lines)


def lens(config: LensConfig, adapter: ModelAdapter | None = None) -> LensRun:
    """Each latent's decoder direction through the unembedding: its top and bottom tokens, the
    high-norm tokens removed; written to `out/lens.json`."""
    from featopt.dictionaries.lens import logit_lens

    check_at_least(config, ["k"])
    if config.drop_top is not None and config.drop_top < 0:
        raise FeatoptError(f"--drop_top must be 0 or more, got {config.drop_top}.")
    if config.drop_z is not None and not config.drop_z == config.drop_z:
        raise FeatoptError("--drop_z must be a number (a z-score such as 3), not nan.")
    adapter, sae = load_model_and_sae(config, adapter)
    latents = parse_latents(config.features, sae.d_sae)
    found = logit_lens(adapter, sae, latents, k=config.k, norm=config.norm, drop_z=config.drop_z, drop_top=config.drop_top)
    records = found.records(adapter.decode)
    out = out_folder(config.out)
    write_record(out, "lens.json", {"run": record_meta("sae lens", config, adapter, sae), "latents": records})
    return LensRun(records, out)


# ----------------------------------------------------------------------------- mcs
@dataclass
class MCSConfig(FolderSettings):
    """Settings of `featopt sae mcs`: each latent's max cosine similarity with another dictionary."""

    sae: str = ""
    """two or more SAE folders at one site, comma-separated"""
    threshold: float = 0.9
    """count latents with MCS at least this"""
    bins: int = 20
    """histogram bins over [0, 1]"""


@dataclass
class MCSRun(CommandResult):
    rows: list[dict]
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        return mcs_text(self.rows)


def mcs(config: MCSConfig) -> MCSRun:
    """Every ordered pair of the SAEs: each latent's max cosine similarity with the other's decoder
    rows, summarized (mean, median, count above the threshold, histogram) in `out/mcs.json` and
    drawn in `out/mcs.png`."""
    from featopt.dictionaries.mcs import mcs_table
    from featopt.models.sae.formats import load_sae

    check_at_least(config, ["bins"])
    if not 0.0 <= config.threshold <= 1.0:
        raise FeatoptError(f"--threshold must be a cosine between 0 and 1, got {config.threshold}.")
    paths = [p.strip() for p in str(config.sae).split(",") if p.strip()]
    if len(paths) < 2:
        raise FeatoptError("--sae needs at least two SAE folders, comma-separated, to compare.")
    saes = [load_sae(p) for p in paths]
    names = [Path(p).name or p for p in paths]
    rows = mcs_table(saes, names, threshold=config.threshold, bins=config.bins)
    out = out_folder(config.out)
    document = {"run": {"command": "sae mcs", "config": record_of(config), "versions": versions(),
                        "saes": [{"path": p, **s.describe()} for p, s in zip(paths, saes)]}, "rows": rows}
    write_record(out, "mcs.json", document)
    _mcs_png(out / "mcs.png", rows, config.threshold)
    return MCSRun(rows, out)


def _mcs_png(path: Path, rows: list[dict], threshold: float) -> None:
    """One histogram line per compared pair, drawn next to the JSON."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        counts = row["histogram"]
        edges = [i / len(counts) for i in range(len(counts) + 1)]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        total = max(sum(counts), 1)
        ax.plot(centers, [c / total for c in counts], marker=".", label=f"{row['a']} in {row['b']}")
    ax.axvline(threshold, color="grey", linestyle=":")
    ax.set_xlabel("max cosine similarity with the other dictionary")
    ax.set_ylabel("fraction of latents")
    ax.legend(fontsize=7)
    save_figure(fig, plt, path)


def mcs_text(rows: list[dict]) -> str:
    """A plain-text table of :func:`featopt.dictionaries.mcs.mcs_table` rows: dictionary a down, b across, each cell
    `mean MCS (latents of a with MCS >= threshold)`; the diagonal is `-`."""
    if not rows:
        raise FeatoptError("no MCS rows to format: give the output of mcs_table.")
    names, sizes = [], {}
    for row in rows:
        for key in ("a", "b"):
            if row[key] not in sizes:
                names.append(row[key])
                sizes[row[key]] = row[f"d_sae_{key}"]
    cells = {(row["a"], row["b"]): f"{row['mean']:.3f} ({row['above']})" for row in rows}
    labels = [f"{name} [{sizes[name]}]" for name in names]
    table = [["a \\ b", *labels]]
    table += [[label, *(cells.get((a, b), "-") for b in names)] for label, a in zip(labels, names)]
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    threshold = rows[0].get("threshold", "threshold")
    lines.append(f"cell: mean max cosine similarity of a's decoder rows to b's (latents of a with MCS >= {threshold})")
    return "\n".join(lines)
