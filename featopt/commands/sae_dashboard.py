"""`featopt sae dashboard`: everything featopt reads about a set of latents, as a static site.

For each latent: the corpus statistics (top and uniform examples, frequency, histogram; computed
here in one pass, or read from a `featopt sae features` folder with `--stats`), the logit lens,
ablated text and direction ablation on its top examples, and what no corpus dashboard shows: the
inputs that *maximize* it, from one exhaustive sweep over the vocabulary (every latent at once)
and one batched gradient-ascent run. Every number also goes into `records.json` beside the pages.

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
    ascent_tokens: int = 4
    """gradient ascent: input length"""
    ascent_steps: int = 100
    """gradient-ascent steps for the optimized input (0: none)"""
    ascent_prior: str = "simplex"
    """simplex (softmax over the vocabulary) or embedding (free embeddings)"""
    ascent_lr: float = 0.1
    """learning rate of the optimized input"""
    prefix: str | None = None
    """text before the exhaustive sweep's token (default: the end-of-text token; none with --bos, whose BOS token
    comes first)"""
    seed: int = 0
    """random seed (the statistics' uniform examples, the gradient-ascent start)"""
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
    for name in ("window_before", "window_after", "ablate_examples", "search_top", "ascent_steps", "ascent_tokens"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 or more, got {getattr(config, name)}.")
    if config.ascent_steps and config.ascent_tokens < 1:
        raise FeatoptError("--ascent_tokens must be at least 1 when --ascent_steps is above 0.")
    check_choice(config, "mode", MODES)
    check_choice(config, "ascent_prior", ("simplex", "embedding"))
    if not config.ascent_lr > 0 or config.ascent_lr == float("inf"):
        raise FeatoptError(f"--ascent_lr must be positive and finite, got {config.ascent_lr}.")
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
    if config.ascent_steps:
        adapter.check_positions(config.ascent_tokens + int(adapter.bos), f"--ascent_tokens {config.ascent_tokens}",
                                f"give at most {(adapter.context_limit or 0) - int(adapter.bos)}")
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


def _prefix(adapter, config: DashboardConfig) -> str:
    """The text before a maximizing input: by default the end-of-text token that separates the
    corpus' documents, so the input sits where a document's first token does (position 1), not
    at position 0, an attention sink the SAE never saw in training (`--skip_first`). With `--bos`
    the BOS token is already there (the prefix follows it), so the default is no text."""
    if config.prefix is not None:
        return config.prefix
    if adapter.bos:
        return ""
    token = getattr(adapter.tokenizer, "eos_token", None) or getattr(adapter.tokenizer, "bos_token", None)
    return token or ""


@torch.inference_mode()
def _measure(view, site, ids: torch.Tensor, latents: list[int]) -> list[float]:
    """Latent `latents[p]` at the last token of `ids[p]` (`[P, T]`), by a forward through the SAE."""
    z = view.run([site], input_ids=ids, bos=view.bos)[site][:, -1]  # [P, d_sae]; after the BOS of --bos
    return [float(z[p, latent]) for p, latent in enumerate(latents)]


def _max_inputs(adapter, sae, config: DashboardConfig, latents: list[int], records: list[dict]) -> None:
    """The exhaustive sweep's best single tokens after the prefix (all latents in one sweep), and
    one gradient-optimized input per latent (all latents in one batched run, the simplex prior by
    default; it maximizes the pre-activation, see `PreActivations`), each re-measured on the latent
    at its last token."""
    from featopt.commands.optimize import AscentConfig, optimize
    from featopt.commands.search import ExhaustiveConfig, exhaustive
    from featopt.models.sae.attach import attach

    prefix = _prefix(adapter, config)
    prefix_ids = adapter.encode(prefix)  # [BOS, prefix...] with --bos
    view, site = attach(adapter, sae)
    listed = ", ".join(map(str, latents))
    found: dict[int, dict] = {latent: {"exhaustive": None, "optimized": None, "prefix": prefix} for latent in latents}
    with tempfile.TemporaryDirectory(prefix="featopt-dashboard-") as work:
        if config.search_top:
            sweep = exhaustive(ExhaustiveConfig(
                model=config.model, bos=adapter.bos, layer=site.layer, site=site.kind,
                features=f"[:, {len(prefix_ids)}, [{listed}]]", prefix=prefix or None, top_k=config.search_top,
                dtype=config.dtype, seed=config.seed, out=f"{work}/exhaustive", progress=config.progress), adapter=view)
            for latent, result in zip(latents, sweep.results):
                top = result.extra["top_k"]
                found[latent]["exhaustive"] = [[t, float(a)] for t, a in zip(top["tokens"], top["activations"])]
        if config.ascent_steps:
            pre = adapter.with_features(site, sae.pre_activation_map())
            last = config.ascent_tokens - 1
            run = optimize(AscentConfig(
                model=config.model, bos=adapter.bos, layer=site.layer, site=site.kind,
                features=f"[:, {last}, [{listed}]]", tokens=config.ascent_tokens, steps=config.ascent_steps,
                prior=config.ascent_prior, lr=config.ascent_lr, objective="maximize", seed=config.seed, out=f"{work}/ascent",
                progress=config.progress, decode_every=max(1, config.ascent_steps)), adapter=pre)
            ids = torch.tensor([r.token_ids for r in run.results], dtype=torch.long)
            measured = _measure(view, site, ids, latents)
            for latent, result, value in zip(latents, run.results, measured):
                found[latent]["optimized"] = {
                    "text": result.text, "tokens": result.tokens, "activation": value, "method": result.method,
                    "steps": config.ascent_steps, "pre_activation": result.activation,
                    "note": "ascent on the latent's pre-activation at the last of the input's tokens (the "
                            + ("first follows the BOS token at position 0" if adapter.bos else "first is position 0")
                            + "); activation re-measured on the latent there"}
    for latent, record in zip(latents, records):
        record["max_inputs"] = found[latent]
