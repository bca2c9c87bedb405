"""`featopt sae dashboard`: everything featopt reads about a set of latents, as a static site.

For each latent: the corpus statistics (top and uniform examples, frequency, histogram; computed
here in one pass, or read from a `featopt sae features` folder with `--stats`), the logit lens,
ablated text and direction ablation on its top examples, the best single tokens from one
exhaustive sweep over the vocabulary (every latent at once), and what no corpus dashboard shows:
the inputs that fire each latent hardest, and the most active of those that read as fluently as
its corpus text, beside its corpus maximum (`featopt sae inputs`, run here for the shown latents,
or read from its folder with `--inputs`). Every number also goes into `records.json` beside the
pages.

The former gradient-ascent input (4 tokens, softmax-simplex prior) is gone: on SmolLM2's topk SAE
it fired 7 of 50 latents once decoded and none above the corpus maximum, where the searched inputs
beat the corpus maximum for most latents (benchmarks/README.md, "Inputs that fire SAE latents").

Ablated text runs on each example's window (the `window_before` tokens before it), the text the
page shows, so its `base` can differ from the example's activation in the full context; direction
ablation runs on the example's full context and is shown on the window.
"""

from __future__ import annotations

import html
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.result import CommandResult
from featopt.commands.loading import bos_id, check_context
from featopt.commands.sae_inputs import default_prefix
from featopt.commands.sae_read import load_model_and_sae, parse_latents
from featopt.commands.settings import CorpusSettings, InputSettings, OutputSettings
from featopt.dictionaries.ablation import MODES
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.results import atomic_write, versions
from featopt.runs.outdir import out_folder


@dataclass
class DashboardConfig(OutputSettings, CorpusSettings, InputSettings):
    """Settings of `featopt sae dashboard`."""

    bos: bool = False
    """start every context, ablated window and maximizing input with the model's BOS token (off: as the source
    documents encode)"""
    sae: str = ""
    """the SAE folder"""
    features: str = "[:, :, 0-49]"
    """latents to show, e.g. "[:, :, 0-49]" """
    stats: str | None = None
    """a featopt sae features folder to reuse"""
    tokens: int = 1_000_000
    """corpus tokens for the statistics"""
    batch_contexts: int = 8
    """contexts per forward"""
    top_k: int = 10
    """top examples per latent (a new pass keeps this many)"""
    n_bins: int = 10
    """equal-width activation bins, one uniform example sampled in each"""
    window_before: int = 24
    """tokens kept before each example"""
    window_after: int = 8
    """tokens kept after each example"""
    lens_k: int = 10
    """logit lens: top and bottom tokens"""
    norm: str = "weight"
    """logit lens: none, weight or apply (see `featopt sae lens`)"""
    drop_z: float | None = 3.0
    """logit lens: drop tokens whose unembedding-row norm has a z-score above this"""
    ablate_examples: int = 3
    """top examples that get ablated text and direction ablation"""
    mode: str = "contribution"
    """direction ablation: contribution (x - z_i W_dec[i]) or projection (remove the direction)"""
    search_top: int = 10
    """best single tokens from the exhaustive sweep (0: none)"""
    input_search: bool = True
    """search the inputs that fire each latent hardest, and fluently (pooled EPO, as featopt sae inputs)"""
    input_tokens: int = 8
    """tokens per searched input"""
    input_steps: int = 10
    """search steps (0: the corpus windows alone)"""
    input_width: int = 16
    """candidates per member and step"""
    input_lambdas: list[float] = field(default_factory=lambda: [0.0])
    """fluency weights, one member per latent each (-activation + lambda * xent)"""
    input_budget: list[float] = field(default_factory=lambda: [4.0])
    """budget weights, one member per latent each (-activation + mu * max(xent - its fluency threshold, 0))"""
    input_likely: int = 256
    """budget members draw swaps among the model's own M likeliest tokens at each position (0: among all)"""
    input_warm: int = 8
    """top corpus windows per latent that start the search"""
    inputs: str | None = None
    """a featopt sae inputs folder to show instead of searching (its latents and model must match)"""
    prefix: str | None = None
    """text before the searched inputs and the sweep's token (default: the end-of-text token; none with --bos,
    whose BOS token comes first)"""
    seed: int = 0
    """random seed (the statistics' uniform examples, the input search)"""
    out: str | None = None
    """the dashboard folder (new, or an old dashboard to replace; default featopt-runs/<time>)"""


@dataclass
class DashboardRun(CommandResult):
    records: list[dict]
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        return f"{len(self.records)} latents; open {self.out / 'index.html'}"

    def page(self, latent: int | None = None) -> LatentPage:
        """A latent's page (default: the first shown); a notebook shows it inline."""
        latent = self.records[0]["latent"] if latent is None else latent
        shown = [r["latent"] for r in self.records]
        if latent not in shown:
            raise FeatoptError(f"latent {latent} has no page in this dashboard: it shows latents {shown}.")
        text = (self.out / f"latent-{latent}.html").read_text(encoding="utf-8")
        css = (self.out / "style.css").read_text(encoding="utf-8")
        return LatentPage(latent, text.replace('<link rel="stylesheet" href="style.css">', f"<style>{css}</style>"))

    def _repr_html_(self) -> str:
        """In Jupyter: the table, then the first latent's page inline."""
        shown = super()._repr_html_()
        return shown + self.page()._repr_html_() if self.records else shown


@dataclass
class LatentPage:
    """One latent's dashboard page: `html` is the whole document (its style inlined), `str()` too;
    a notebook shows it inline."""

    latent: int
    html: str

    def __str__(self) -> str:
        return self.html

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html)}" title="latent {self.latent}" '
                'style="width:100%;height:640px;border:1px solid #ddd"></iframe>')


def _check(config: DashboardConfig, out: Path) -> None:
    check_at_least(config, ["tokens", "context_length", "batch_contexts", "top_k", "n_bins", "lens_k"])
    for name in ("window_before", "window_after", "ablate_examples", "search_top"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 or more, got {getattr(config, name)}.")
    check_choice(config, "mode", MODES)
    if config.input_search and not config.inputs:
        _input_settings(config).check(INPUT_FLAGS)
    if not config.corpus and not config.stats:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    if out.exists() and not out.is_dir():
        raise FeatoptError(f"--out {str(out)!r} is a file: give a new folder or an old dashboard to replace.")
    if out.is_dir() and any(out.iterdir()) and not (out / "dashboard.json").is_file():
        raise FeatoptError(f"--out {str(out)!r} exists and is not a featopt dashboard: give a new folder or an old "
                           "dashboard to replace.")


def dashboard(config: DashboardConfig, adapter: ModelAdapter | None = None) -> DashboardRun:
    """Compute every view for the latents of `config.features` and write the site into `out`."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries.corpus_stats import corpus_stats
    from featopt.dictionaries.dashboard import write_dashboard
    from featopt.dictionaries.feature_stats import FeatureStats
    from featopt.dictionaries.lens import logit_lens

    out = out_folder(config.out)
    _check(config, out)
    adapter, sae = load_model_and_sae(config, adapter)
    latents = parse_latents(config.features, sae.d_sae)
    if config.input_search and not config.inputs:
        prefix_length = len(adapter.encode(default_prefix(adapter, config.prefix)))
        adapter.check_positions(prefix_length + config.input_tokens, f"--input_tokens {config.input_tokens} after a "
                                f"{prefix_length}-token prefix", f"give at most {(adapter.context_limit or 0) - prefix_length}")
    found_inputs = _stored_inputs(config, adapter, sae, latents) if config.inputs else None
    settings = config
    if config.stats:
        stats = FeatureStats.load(config.stats)
        if stats.meta.get("sae", {}).get("sha256") not in (None, sae.describe()["sha256"]):
            raise FeatoptError(f"--stats {config.stats!r} was computed for another SAE (hash "
                               f"{stats.meta['sae']['sha256']}), not {config.sae!r}: recompute it or drop --stats.")
        settings = _StatsSettings(stats.meta.get("config", {}), config)
        if bool(stats.meta.get("config", {}).get("bos", False)) != adapter.bos:
            raise FeatoptError(f"--stats {config.stats!r} was computed {'with' if not adapter.bos else 'without'} "
                               f"--bos, so its examples index other contexts: give the same --bos or drop --stats.")
    check_context(adapter, settings.context_length)
    contexts, sources = corpus_contexts(adapter.tokenizer, settings.corpus, settings.context_length, split=settings.split,
                                        eval_fraction=settings.eval_fraction, max_tokens=settings.tokens,
                                        with_sources=True, bos=bos_id(adapter))
    if not config.stats:
        stats = corpus_stats(adapter, sae, contexts, sources=sources, batch_contexts=config.batch_contexts,
                             top_k=config.top_k, n_bins=config.n_bins, window=(config.window_before, config.window_after),
                             seed=config.seed, skip_first=config.skip_first, progress=config.progress)
    records = [stats.record(i, lambda t: adapter.decode([t])) for i in latents]
    lens = logit_lens(adapter, sae, latents, k=config.lens_k, norm=config.norm, drop_z=config.drop_z).records(adapter.decode)
    for record, lens_record in zip(records, lens):
        record["logit_lens"] = lens_record
    if config.ablate_examples:
        _ablations(adapter, sae, contexts, latents, records, config)
    _max_inputs(adapter, sae, config, latents, records)
    if found_inputs is not None:
        for record in records:
            record["inputs"] = found_inputs[record["latent"]]
    elif config.input_search:
        _search_inputs(adapter, sae, config, stats, latents, records)
    run = {"command": "sae dashboard", "config": record_of(config), "model": adapter.name, "sae": sae.describe(),
           "corpus": settings.corpus, "tokens": stats.tokens, "seed": config.seed,
           "dtype": str(adapter.dtype).replace("torch.", ""), "versions": versions()}
    write_dashboard(out, run, records)
    # The numbers behind the pages, for notebooks (the same records the pages render).
    text = json.dumps({"run": run, "latents": records}, indent=2, ensure_ascii=False)
    atomic_write(out / "records.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return DashboardRun(records, out)


class _StatsSettings:
    """The corpus settings a stored `features` run used (so its examples index the same contexts)."""

    def __init__(self, stored: dict, config: DashboardConfig):
        for name in ("corpus", "split", "eval_fraction", "tokens", "context_length"):
            setattr(self, name, stored.get(name, getattr(config, name)))


def _ablations(adapter, sae, contexts, latents, records, config) -> None:
    """Ablated text and direction ablation on each latent's first `ablate_examples` top examples.
    With `--bos` every window runs after the context's BOS token (column 0), which is kept."""
    from featopt.dictionaries.ablation import ablated_text, direction_ablation

    from tqdm.auto import tqdm

    L, decode, kept = contexts.shape[1], adapter.decode, int(adapter.bos)
    for latent, record in tqdm(list(zip(latents, records)), desc="ablations", unit="latent", disable=not config.progress):
        examples = record["top_examples"][: config.ablate_examples]
        texts, effects, rows, spans = [], [], [], []
        for j, ex in enumerate(examples):
            c, p = ex["context"], ex["index"]
            start = max(kept, p - config.window_before)
            if p - start >= 1:
                window = torch.cat([contexts[c, :kept], contexts[c, start:p + 1]])
                ablated = ablated_text(adapter, sae, latent, window, kept + p - start, first=kept)
                texts.append({"example": j, **ablated.record(decode)})
            rows.append(contexts[c])
            spans.append((j, c, start, min(L, p + config.window_after + 1)))
        if rows:
            found = direction_ablation(adapter, sae, latent, torch.stack(rows), mode=config.mode, top=10)
            for b, (j, c, start, end) in enumerate(spans):
                # delta[b, q] is the change of log p(token q+1 | tokens <= q): the window's own pairs.
                effects.append({"example": j, "tokens": [decode([int(t)]) for t in contexts[c, start:end]],
                                "delta": [float(d) for d in found.delta[b, start:end - 1]]})
            summary = found.record(decode)
            record["direction_ablation"] = {"mode": config.mode, "examples": effects,
                                            "decreased": summary["decreased"], "increased": summary["increased"]}
        record["ablated_text"] = texts


def _max_inputs(adapter, sae, config: DashboardConfig, latents: list[int], records: list[dict]) -> None:
    """The exhaustive sweep's best single tokens after the prefix (all latents in one sweep),
    each re-measured on the latent at its token."""
    from featopt.commands.search import ExhaustiveConfig, exhaustive
    from featopt.models.sae.attach import attach

    prefix = default_prefix(adapter, config.prefix)
    prefix_ids = adapter.encode(prefix)  # [BOS, prefix...] with --bos
    view, site = attach(adapter, sae)
    listed = ", ".join(map(str, latents))
    found: dict[int, dict] = {latent: {"exhaustive": None, "prefix": prefix} for latent in latents}
    with tempfile.TemporaryDirectory(prefix="featopt-dashboard-") as work:
        if config.search_top:
            sweep = exhaustive(ExhaustiveConfig(
                model=config.model, bos=adapter.bos, layer=site.layer, site=site.kind,
                features=f"[:, {len(prefix_ids)}, [{listed}]]", prefix=prefix or None, top_k=config.search_top,
                dtype=config.dtype, seed=config.seed, out=f"{work}/exhaustive", progress=config.progress), adapter=view)
            for latent, result in zip(latents, sweep.results):
                top = result.extra["top_k"]
                found[latent]["exhaustive"] = [[t, float(a)] for t, a in zip(top["tokens"], top["activations"])]
    for latent, record in zip(latents, records):
        record["max_inputs"] = found[latent]


INPUT_FLAGS = {"tokens": "--input_tokens", "steps": "--input_steps", "search_width": "--input_width",
               "lambdas": "--input_lambdas", "budget": "--input_budget", "warm": "--input_warm",
               "likely": "--input_likely"}


def _input_settings(config: DashboardConfig):
    from featopt.dictionaries.inputs import InputSearch

    return InputSearch(tokens=config.input_tokens, steps=config.input_steps, search_width=config.input_width,
                       lambdas=list(config.input_lambdas), budget=list(config.input_budget), warm=config.input_warm, likely=config.input_likely,
                       seed=config.seed,
                       progress=config.progress)


def _search_inputs(adapter, sae, config: DashboardConfig, stats, latents: list[int], records: list[dict]) -> None:
    """`featopt sae inputs` for the shown latents, warm-started from the statistics' windows."""
    from featopt.commands.sae_inputs import latent_objectives
    from featopt.dictionaries import corpus_windows, inputs
    from featopt.discrete.tokens import allowed_ids

    settings = _input_settings(config)
    prefix = adapter.encode(default_prefix(adapter, config.prefix))
    windows = corpus_windows.from_stats(stats, latents, settings.tokens, bos=adapter.bos, flag="--input_tokens")
    objective, measure = latent_objectives(adapter, sae, latents)
    found = inputs.search(adapter, objective, measure, windows, prefix=prefix, allowed=allowed_ids(adapter), settings=settings)
    for record, row in zip(records, inputs.records(adapter, measure, found, prefix, settings.front_size)):
        record["inputs"] = row


def _stored_inputs(config: DashboardConfig, adapter, sae, latents: list[int]) -> dict[int, dict]:
    """Each latent's record from a `featopt sae inputs` folder; one sentence when it does not fit."""
    from featopt.results import read_results

    try:
        run, results = read_results(config.inputs)
    except (FeatoptError, OSError, ValueError):
        raise FeatoptError(f"--inputs {config.inputs!r} is not a featopt sae inputs folder (no readable results.json): "
                           "give the --out of a featopt sae inputs run.") from None
    if run.get("command") != "sae inputs":
        raise FeatoptError(f"--inputs {config.inputs!r} holds results of {run.get('command') or run.get('method')!r}, "
                           "not of featopt sae inputs: give the --out of a featopt sae inputs run.")
    by_latent = {}
    for r in results:
        if (r.feature_map or {}).get("sha256") not in (None, sae.describe()["sha256"]) or r.model != adapter.name:
            raise FeatoptError(f"--inputs {config.inputs!r} was searched for another model or SAE: search it for "
                               f"{config.sae!r} or drop --inputs.")
        by_latent[int(r.spec.strip("[]").split(",")[-1])] = r.extra
    missing = [i for i in latents if i not in by_latent]
    if missing:
        raise FeatoptError(f"--inputs {config.inputs!r} has no inputs for latent {missing[0]}: it holds latents "
                           f"{sorted(by_latent)[:20]}; search those latents or show fewer.")
    return by_latent
