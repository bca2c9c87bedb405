"""`featopt sae inputs`: for every latent of a set (or neurons, or directions, through the
objective), the inputs that fire it hardest, and the most active of those that read as fluently
as its corpus text, each set beside the latent's corpus maximum.

One pooled EPO search for all features (see :mod:`featopt.dictionaries.inputs`), warm-started
from each feature's top corpus windows, which also give the yardstick: the corpus max and the
fluency threshold (the median cross-entropy of the windows). The inputs follow a fixed prefix
(the end-of-text separator by default, the BOS token with `--bos`), so they never sit at position
0, the attention sink no SAE trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_choice, record_of
from featopt.commands.loading import bos_id, check_context, load_for, site_list
from featopt.commands.result import CommandResult
from featopt.commands.settings import CorpusSettings, InputSettings, OutputSettings, SeedSettings, TargetSettings
from featopt.commands.targets import objective_for
from featopt.dictionaries.inputs import InputSearch
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.results import FeatureResult, versions, write_results
from featopt.runs.outdir import out_folder


@dataclass
class InputsConfig(OutputSettings, CorpusSettings, TargetSettings, SeedSettings, InputSettings):
    """Settings of `featopt sae inputs`."""

    model: str = "tiny-llama"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    features: str = "[:, :, 0-9]"
    """the latents (with --sae) or features at --site: "[:, :, 0-511]", "[:, :, [3, 17]]", or "all" """
    sample: int = 0
    """search this many of --features, chosen by --seed among those that fire in the corpus (0: all of them)"""
    stats: str | None = None
    """a `featopt sae features` folder: its top examples are the warm starts and the yardstick (else --corpus)"""
    corpus_tokens: int = 200_000
    """corpus tokens read for the top examples when there is no --stats"""
    top_k: int = 20
    """top examples per feature read from --corpus (their windows give the fluency threshold)"""
    tokens: int = 8
    """N tokens per input, after the prefix"""
    steps: int = 30
    """search steps"""
    search_width: int = 32
    """candidates per member and step"""
    topk: int = 64
    """tokens per position that swaps are drawn from"""
    lambdas: list[float] = field(default_factory=lambda: [0.0])
    """fluency weights, one member per feature each: member m minimizes -activation + lambda_m * xent"""
    budget: list[float] = field(default_factory=lambda: [4.0])
    """budget weights, one member per feature each: -activation + mu * max(xent - the feature's fluency threshold, 0)"""
    likely: int = 256
    """budget members draw swaps among the model's own M likeliest tokens at each position, ranked by the gradient
    (0: among all tokens)"""
    warm: int = 8
    """top corpus windows per feature scored before the first step (0: none)"""
    sweep: int = 0
    """the exhaustive sweep's best single tokens per feature, each put last in its 2 best windows as starts (0: no sweep)"""
    init: str = "corpus"
    """where members start: corpus (the feature's top windows), random, or a text"""
    buffer_size: int = 4
    """best distinct inputs kept per member"""
    pool: bool = True
    """score every candidate for every feature (one forward serves all)"""
    front_size: int = 16
    """front points reported per feature (evenly spread, the most active always among them)"""
    prefix: str | None = None
    """text before the input (default: the end-of-text token; none with --bos, whose BOS token comes first)"""
    allow: str = "no-special"
    """tokens the search may use: all, no-special or ascii"""
    batch_size: int = 0
    """candidates per forward (0: automatic)"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps"""


@dataclass
class InputsRun(CommandResult):
    """Per feature its record (see `featopt.dictionaries.inputs.records`), the run's summary, the folder."""

    records: list[dict]
    summary: dict
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        def num(x, f="{:.3g}"):
            return "-" if x is None else f.format(x)

        lines = [f"{'feature':<36} {'corpus max':>10} {'best/max':>9} {'fluent/max':>10} {'xent':>6} {'median':>6}  best fluent input"]
        for r in self.records:
            fluent = r["best_fluent"] or {}
            lines.append(f"{r['site'] + ' ' + r['spec']:<36.36} {num(r['corpus_max']):>10} {num(r['best_ratio']):>9} "
                         f"{num(r['best_fluent_ratio']):>10} {num(fluent.get('xent')):>6} {num(r['fluency_threshold']):>6}  "
                         f"{fluent.get('text', '-')!r}")
        s = self.summary
        lines.append(f"best >= corpus max: {s['best_at_least_corpus_max']}/{s['firing_in_corpus']}, median ratio "
                     f"{num(s['median_best_ratio'])}; fluent >= corpus max: {s['fluent_at_least_corpus_max']}/"
                     f"{s['firing_in_corpus']}, median ratio {num(s['median_fluent_ratio'])}; results in {self.out}")
        return "\n".join(lines)


def search_settings(config) -> InputSearch:
    """The search part of a config (this command's, or the dashboard's `input_*` flags)."""
    return InputSearch(tokens=config.tokens, steps=config.steps, search_width=config.search_width, topk=config.topk,
                       lambdas=list(config.lambdas), budget=list(config.budget), warm=config.warm, likely=config.likely, sweep=config.sweep, buffer_size=config.buffer_size, pool=config.pool,
                       front_size=config.front_size, batch_size=config.batch_size, seed=config.seed,
                       progress=config.progress)


def _check(config: InputsConfig) -> None:
    search_settings(config).check()
    for name in ("sample", "corpus_tokens", "top_k"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sample" else 1):
            raise FeatoptError(f"--{name} must be a whole number of at least {0 if name == 'sample' else 1}, got {value!r}.")
    check_choice(config, "allow", ("all", "no-special", "ascii"))
    dtype_of(config.dtype)
    if not isinstance(config.init, str) or not config.init.strip():
        raise FeatoptError("--init is empty: give corpus, random or a text to start from.")
    if not config.stats and not config.corpus:
        raise FeatoptError("--corpus is required (the top examples are the warm starts and the yardstick): give a folder "
                           "of .txt files or one .txt file, or a featopt sae features folder with --stats.")
    if config.stats and not config.sae:
        raise FeatoptError("--stats holds an SAE's latents: give its --sae too, or --corpus for other features.")


def default_prefix(adapter: ModelAdapter, prefix: str | None) -> str:
    """The text before an input: by default the end-of-text token that separates the corpus'
    documents (so the input's first token sits where a document's does, at position 1); with
    `--bos` the BOS token is already first, so no text."""
    if prefix is not None:
        return prefix
    if adapter.bos:
        return ""
    token = getattr(adapter.tokenizer, "eos_token", None) or getattr(adapter.tokenizer, "bos_token", None)
    return token or ""


def _latents(config: InputsConfig, d_sae: int) -> list[int]:
    from featopt.commands.sae_read import parse_latents

    return list(range(d_sae)) if str(config.features).strip() == "all" else parse_latents(config.features, d_sae)


def _sample(chosen: list[int], maximum: torch.Tensor, k: int, seed: int) -> list[int]:
    """`k` of `chosen` (whose corpus maxima are `maximum`), drawn by `seed` among those that fire."""
    firing = [c for c, m in zip(chosen, maximum.tolist()) if m > 0]
    if k > len(firing):
        raise FeatoptError(f"--sample {k} asks for more features than fire in the corpus: {len(firing)} of the "
                           f"{len(chosen)} chosen do.")
    picks = torch.randperm(len(firing), generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(firing[i] for i in picks.tolist())


def latent_objectives(adapter: ModelAdapter, sae, latents: list[int]):
    """`(objective, measure)` for SAE latents read at an input's last token, bound to the plain
    `adapter`: the search climbs each latent's firing score (a topk latent outside the k largest
    climbs towards entering them, see `SparseAutoencoder.firing_score`); `measure` is the latent."""
    from featopt.models.sae.attach import site_of
    from featopt.objectives import latent
    from featopt.objectives.selection import Selection
    from featopt.objectives.targets import Maximize

    spec = f"[:, :, [{', '.join(map(str, latents))}]]"
    site = adapter.site(site_of(sae))
    measure = latent(sae, spec, over="last").bind(adapter)
    return Maximize(Selection(site, spec, feature_map=sae.firing_map(), over="last")).bind(adapter), measure


def inputs(config: InputsConfig, adapter: ModelAdapter | None = None) -> InputsRun:
    """Search inputs for every chosen feature; `out/results.json` (one result per feature, its
    `extra` the whole record) and `out/fronts.png`."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries import corpus_windows, inputs as method
    from featopt.discrete.tokens import allowed_ids, check_length

    _check(config)
    sae = None
    if config.sae and config.objective == "maximize":
        from featopt.commands.sae_read import load_model_and_sae

        adapter, sae = load_model_and_sae(config, adapter)
    else:
        adapter = load_for(config, adapter)
    out = out_folder(config.out)
    prefix = adapter.encode(default_prefix(adapter, config.prefix))
    check_length(adapter, len(prefix), config.tokens)
    allowed = allowed_ids(adapter, config.allow)
    init = None
    if config.init not in ("corpus", "random"):
        init = adapter.encode(config.init, bos=False)
        if len(init) != config.tokens:
            raise FeatoptError(f"--init {config.init!r} is {len(init)} tokens but --tokens is {config.tokens}: "
                               "give a text of that many tokens, corpus or random.")

    stats = None
    if config.stats:
        from featopt.dictionaries.feature_stats import FeatureStats

        stats = FeatureStats.load(config.stats)
        if stats.meta.get("sae", {}).get("sha256") not in (None, sae.describe()["sha256"]):
            raise FeatoptError(f"--stats {config.stats!r} was computed for another SAE: recompute it or drop --stats.")
        if bool(stats.meta.get("config", {}).get("bos", stats.meta.get("bos", False))) != adapter.bos:
            raise FeatoptError(f"--stats {config.stats!r} was computed {'with' if not adapter.bos else 'without'} --bos: "
                               "give the same --bos or drop --stats.")
    if sae is not None:
        chosen = _latents(config, sae.d_sae)
        if config.sample:
            if stats is None:
                raise FeatoptError("--sample draws among latents that fire in the corpus: give --stats (a featopt sae "
                                   "features folder).")
            chosen = _sample(chosen, stats.max[chosen], config.sample, config.seed)
        objective, measure = latent_objectives(adapter, sae, chosen)
    else:
        if config.sample:
            raise FeatoptError("--sample draws among an SAE's latents: give --sae and --stats.")
        objective = measure = objective_for(config, adapter, site_list(adapter, config), over="last")
    if stats is not None:
        windows = corpus_windows.from_stats(stats, chosen, config.tokens, bos=adapter.bos)
    else:
        check_context(adapter, config.context_length)
        contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                                   eval_fraction=config.eval_fraction, max_tokens=config.corpus_tokens, bos=bos_id(adapter))
        windows = corpus_windows.from_corpus(adapter, measure, contexts, config.tokens, top_k=config.top_k,
                                             skip_first=config.skip_first, progress=config.progress)

    settings = search_settings(config)
    found = method.search(adapter, objective, measure, windows, prefix=prefix, allowed=allowed, settings=settings,
                          init=init if init is not None else config.init)
    rows = method.records(adapter, measure, found, prefix, config.front_size)
    summary = method.summary(rows)
    run = {"command": "sae inputs", "config": record_of(config), "model": adapter.name, "prefix_ids": prefix.tolist(),
           "objective": objective.description, "measured": measure.description, "summary": summary,
           "forward_evaluations": found.evaluations, "sweep_tokens": found.sweep_forwards,
           "allowed_tokens": len(allowed), "stats": config.stats}
    write_results(out, _results(adapter, measure, rows, config), run)
    method.plot(rows, out / "fronts.png")
    return InputsRun(rows, summary, out)


def _results(adapter: ModelAdapter, measure, rows: list[dict], config: InputsConfig) -> list[FeatureResult]:
    from featopt.objectives.problems import feature_maps

    stamp, maps = versions(), feature_maps(measure, adapter)
    out = []
    for p, r in enumerate(rows):
        best = r["best"] or {"token_ids": [], "tokens": [], "text": "", "activation": float("nan")}
        out.append(FeatureResult(
            spec=r["spec"], site=r["site"], method="inputs", objective=measure.description, token_ids=best["token_ids"],
            tokens=best["tokens"], text=best["text"], activation=best["activation"], model=adapter.name, bos=adapter.bos,
            seed=config.seed, dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp, feature_map=maps[p],
            extra=r))
    return out
