"""The `featopt sae ...` commands: `train`, `cache` and `eval`, each a flat config dataclass and a
`run_*` function (the command line and recipes call them; notebooks can too)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site, load_model, model_options
from featopt.results import atomic_write, versions
from featopt.discrete.common import DTYPES
from featopt.models.sae.attach import attach

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true")


def _sizes(values: str | int | None, flag: str) -> list[float]:
    if values is None:
        return []
    out = []
    for item in str(values).split(","):
        try:
            number = float(item)
        except ValueError:
            raise FeatoptError(f"{flag} {values!r} is malformed: write a number or a comma-separated list, like 4 or 1,2,4,8.") from None
        if not number > 0 or number != number or number == float("inf"):
            raise FeatoptError(f"{flag} must be positive and finite, got {item.strip()!r}.")
        out.append(number)
    return out


def _sites(adapter: ModelAdapter, site: str) -> list[Site]:
    return list(dict.fromkeys(adapter.site(s.strip()) for s in str(site).split(",") if s.strip()))


def bos_id(adapter: ModelAdapter) -> int | None:
    """The id that starts every corpus context under the run's `--bos` (None without it)."""
    return adapter.bos_token_id() if adapter.bos else None


def _check_context(adapter: ModelAdapter, length: int) -> None:
    adapter.check_positions(length, f"--context_length {length}", f"give at most {adapter.context_limit}")


def _load(config, adapter: ModelAdapter | None) -> ModelAdapter:
    """The config's model, or `adapter` seen with the config's `--bos`."""
    if adapter is None:
        return load_model(config.model, dtype=DTYPES[config.dtype], **model_options(config))
    return adapter.with_bos(config.bos)


def _out(out: str | None) -> Path:
    return Path(out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))


def _check_positive(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {value}.")


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """Settings of `featopt sae train`."""

    model: str = "tiny-llama"
    bos: bool = False  # start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    site: str = "blocks.1.resid_post"  # several: "blocks.3.resid_post,blocks.6.resid_post"
    corpus: str | None = None  # a folder of .txt files (or one .txt file)
    activations: str | None = None  # train from a cache written by `featopt sae cache` instead
    architecture: str = "topk"  # relu, topk, or jumprelu (loading only; not trained)
    expansion: str = "4"  # d_sae / d_in; "1,2,4,8" trains one SAE per size from the same pass
    d_sae: str | None = None  # latents, instead of --expansion (a list trains several)
    k: int = 32  # topk: latents kept per token
    l1: float = 5.0  # relu: sparsity coefficient (on the scale of a fraction of variance)
    tokens: int = 2_000_000  # training budget
    context_length: int = 128
    batch_size: int = 4096  # tokens per step (the global batch, whatever the number of devices)
    buffer_batches: int = 16  # batches drawn from one shuffled buffer of contexts
    lr: float | None = None  # default: 2e-4 / sqrt(d_sae / 2^14), per SAE
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over this last fraction of the steps
    normalize: bool = True  # scale inputs to mean squared norm d_in (folded into the saved weights)
    auxk_alpha: float = 1 / 32  # topk: weight of the AuxK loss on dead latents (0: off)
    dead_tokens: int = 500_000  # a latent unseen for this many tokens is dead
    skip_first: int = 1  # leading positions of every context left out (attention-sink outliers)
    eval_fraction: float = 0.05  # held out at the end of every document
    eval_contexts: int = 64  # held-out contexts evaluated at the end (0: skip)
    eval_every: int = 0  # also evaluate on them every N steps, logged to TensorBoard (0: at the end only)
    seed: int = 0
    dtype: str = "float32"  # the model's
    precision: str = "32-true"  # or bf16-mixed
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    out: str | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    resume: str | None = None
    progress: bool = True


@dataclass
class TrainRun:
    saes: list  # SparseAutoencoder, raw-activation scale
    paths: list[Path]
    metrics: list[dict]
    out: Path
    module: object = None
    trainer: object = None


def _check_train(config: TrainConfig) -> None:
    from featopt.models.sae.model import ARCHITECTURES

    _check_positive(config, ("tokens", "context_length", "batch_size", "buffer_batches", "devices", "log_every", "k"))
    if config.architecture not in ARCHITECTURES:
        raise FeatoptError(f"unknown SAE architecture {config.architecture!r}: allowed are {', '.join(ARCHITECTURES)}.")
    if config.architecture == "jumprelu":
        raise FeatoptError("training jumprelu SAEs is not supported: train relu or topk (jumprelu SAEs load and run).")
    if config.precision not in PRECISIONS:
        raise FeatoptError(f"--precision {config.precision!r} is not known: allowed are {', '.join(PRECISIONS)}.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    for name in ("l1", "auxk_alpha", "decay_fraction", "eval_fraction"):
        value = getattr(config, name)
        if not (value >= 0 and value != float("inf")):
            raise FeatoptError(f"--{name} must be a finite number of at least 0, got {value}.")
    if config.decay_fraction > 1:
        raise FeatoptError(f"--decay_fraction must be between 0 and 1, got {config.decay_fraction}.")
    if config.lr is not None and not (0 < config.lr < float("inf")):
        raise FeatoptError(f"--lr must be positive and finite, got {config.lr}.")
    for name in ("warmup_steps", "skip_first", "eval_contexts", "eval_every", "checkpoint_every", "dead_tokens"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 or more, got {getattr(config, name)}.")
    if config.skip_first >= config.context_length:
        raise FeatoptError(f"--skip_first {config.skip_first} leaves no position of a {config.context_length}-token context.")
    _sizes(config.d_sae, "--d_sae") if config.d_sae else _sizes(config.expansion, "--expansion")
    if (config.corpus is None) == (config.activations is None):
        raise FeatoptError("give exactly one of --corpus (a folder of .txt files) and --activations (a cache from `featopt sae cache`).")
    if config.resume and not Path(config.resume).is_file():
        raise FeatoptError(f"checkpoint {config.resume!r} to resume from does not exist.")


def sae_configs(config: TrainConfig, adapter: ModelAdapter, sites: list[Site]) -> list:
    """One SAEConfig per (site, size), site-major."""
    from featopt.models.sae.model import SAEConfig

    out = []
    for site in sites:
        d_in = adapter.width(site)
        sizes = [int(d) for d in _sizes(config.d_sae, "--d_sae")] if config.d_sae else \
            [int(round(e * d_in)) for e in _sizes(config.expansion, "--expansion")]
        for d_sae in sizes:
            if config.architecture == "topk" and config.k > d_sae:
                raise FeatoptError(f"--k {config.k} is more than the {d_sae} latents of the SAE: give k <= d_sae.")
            out.append(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=config.architecture,
                                 k=config.k if config.architecture == "topk" else None, hook_name=site.name,
                                 model_name=adapter.name, metadata={}))
    return out


def run_train(config: TrainConfig, adapter: ModelAdapter | None = None) -> TrainRun:
    """Train every SAE of `config` from one stream of activations, save each in SAELens' format
    (in `out/` for one SAE, `out/<name>/` for several), evaluate them on held-out text."""
    import functools

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from featopt.runs import checkpoints
    from featopt.data import corpus_contexts
    from featopt.runs.handle import ModelHandle
    from featopt.runs.lightning import StepsDataModule, resolve_strategy
    from featopt.dictionaries.activations import cached_source, model_source
    from featopt.dictionaries.train import HeldOutEval, SAETraining, auto_lr

    _check_train(config)
    loader = functools.partial(load_model, config.model, dtype=DTYPES[config.dtype], seed=config.seed,
                               **model_options(config))
    adapter = loader() if adapter is None else adapter.with_bos(config.bos)
    sites = _sites(adapter, config.site)
    if not sites:
        raise FeatoptError("--site names no site: give one like blocks.6.resid_post.")
    _check_context(adapter, config.context_length)
    configs = sae_configs(config, adapter, sites)
    if config.activations:
        cache = cached_source(config.activations)  # read once; the stream reuses it
        missing = [s.name for s in sites if s not in cache.sites]
        if missing:
            raise FeatoptError(f"the activation cache holds {', '.join(s.name for s in cache.sites)}, not {', '.join(missing)}: "
                               "train at a cached site or cache this one.")
        if bool(cache.meta.get("bos", False)) != config.bos:  # caches written before the field: no BOS
            cached = "start with the BOS token" if cache.meta.get("bos") else "have no BOS token"
            raise FeatoptError(f"the contexts of the activation cache {config.activations!r} {cached}, but this run "
                               f"{'has' if config.bos else 'has no'} --bos: give the --bos setting the cache was "
                               f"written with, or cache again.")
        n_contexts, context_length = cache.meta["contexts_shape"]
        make_source = functools.partial(cached_source, config.activations)
        corpus = cache.meta.get("corpus")
    else:
        contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split="train",
                                   eval_fraction=config.eval_fraction, bos=bos_id(adapter))
        n_contexts, context_length = contexts.shape
        make_source = functools.partial(model_source, contexts=contexts, sites=sites)
        corpus = config.corpus
    steps = -(-config.tokens // config.batch_size)
    # Spawned workers rebuild the model by name when it is the one the config names; training from
    # a cache needs no model at all.
    handle = None if config.activations else ModelHandle(
        adapter, loader if adapter.info is not None and adapter.info.name == config.model else None)
    module = SAETraining(
        configs, handle, make_source, n_contexts=n_contexts, context_length=context_length,
        batch_tokens=config.batch_size, buffer_batches=config.buffer_batches, skip_first=config.skip_first,
        seed=config.seed, lrs=[config.lr or auto_lr(c.d_sae) for c in configs], warmup_steps=config.warmup_steps,
        decay_fraction=config.decay_fraction, l1=config.l1, auxk_alpha=config.auxk_alpha,
        dead_tokens=config.dead_tokens, normalize=config.normalize,
    )
    out = _out(config.out)
    strategy = resolve_strategy(config.strategy, config.devices, config.accelerator)
    callbacks = []
    held_out = None
    if config.eval_contexts and corpus is not None:
        held_out = corpus_contexts(adapter.tokenizer, corpus, context_length, split="eval",
                                   eval_fraction=config.eval_fraction, bos=bos_id(adapter))[: config.eval_contexts]
        if config.eval_every:
            callbacks.append(HeldOutEval(held_out, config.eval_every, skip_first=config.skip_first))
    callbacks.extend(checkpoints.callbacks("sae train", out, config.checkpoint_every))
    if config.resume:
        checkpoints.check_resume(config.resume, module, "sae train")
    trainer = L.Trainer(
        accelerator=config.accelerator, devices=config.devices, strategy=strategy, precision=config.precision,
        max_steps=steps, logger=TensorBoardLogger(out, name="tensorboard", version=""), callbacks=callbacks,
        enable_checkpointing=bool(config.checkpoint_every), enable_progress_bar=config.progress,
        enable_model_summary=False, log_every_n_steps=config.log_every, num_sanity_val_steps=0,
    )
    L.seed_everything(config.seed, verbose=False)
    with checkpoints.resume_hint(out, config.checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(steps), ckpt_path=config.resume, weights_only=True)
    if not trainer.is_global_zero:
        return TrainRun([], [], [], out, module, trainer)
    saes = [module.export(i) for i in range(len(configs))]
    several = len(saes) > 1
    metrics: list[dict] = []
    if held_out is not None:
        from featopt.dictionaries.evaluate import evaluate

        metrics = evaluate(adapter.to(module.device), saes, held_out.to(adapter.device), skip_first=config.skip_first)
    paths = []
    stamp = versions()
    for i, sae in enumerate(saes):
        sae.cfg.metadata = {
            "trained_by": "featopt", "model": adapter.name, "corpus": str(corpus), "tokens": steps * config.batch_size,
            "seed": config.seed, "bos": config.bos, "precision": config.precision, "model_dtype": config.dtype,
            "input_scale_folded": float(module.scales[module.site_list.index(module.sites[i])]),
            "train_config": asdict(config), "versions": stamp,
            **({"held_out_metrics": metrics[i]} if metrics else {}),
        }
        path = out / module.sae_name(i) if several else out
        _save_into(sae, path)
        paths.append(path)
    document = {"run": {"command": "sae train", "config": asdict(config), "versions": stamp, "steps": steps,
                        "tokens": steps * config.batch_size},
                "saes": [{"path": str(p), "name": module.sae_name(i), "hash": saes[i].content_hash(),
                          **({"metrics": metrics[i]} if metrics else {})} for i, p in enumerate(paths)]}
    atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2)))
    return TrainRun(saes, paths, metrics, out, module, trainer)


def _save_into(sae, folder: Path) -> None:
    """Save `sae` in SAELens' format into `folder`, which may also hold the run's logs: written
    beside it, then each file renamed into place (the weights first, cfg.json last)."""
    import os
    import shutil

    from featopt.models.sae.formats import save_sae

    staging = folder / ".sae-staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_sae(sae, staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == "cfg.json"):
        os.replace(staging / name, folder / name)
    staging.rmdir()


def format_train(run: TrainRun) -> str:
    from featopt.dictionaries.evaluate import format_metrics

    lines = [f"saved: {p}" for p in run.paths]
    if run.metrics:
        lines.insert(0, format_metrics(run.metrics, [p.name for p in run.paths]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    """Settings of `featopt sae cache`: activations of a corpus' contexts, saved for training."""

    model: str = "tiny-llama"
    bos: bool = False  # start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    site: str = "blocks.1.resid_post"
    corpus: str = ""
    context_length: int = 128
    eval_fraction: float = 0.05
    split: str = "train"
    max_tokens: int | None = None
    dtype: str = "float32"
    batch_contexts: int = 16
    out: str | None = None
    progress: bool = True


@dataclass
class CacheRun:
    out: Path
    tokens: int


def run_cache(config: CacheConfig, adapter: ModelAdapter | None = None) -> CacheRun:
    from featopt.data import corpus_contexts
    from featopt.dictionaries.activations import ModelSource, write_cache

    _check_positive(config, ("context_length", "batch_contexts"))
    if config.max_tokens is not None and config.max_tokens < 1:
        raise FeatoptError(f"--max_tokens must be at least 1 (or unset: the whole split), got {config.max_tokens}.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    out = _out(config.out)
    if out.exists():
        raise FeatoptError(f"the cache folder {str(out)!r} already exists: give a new folder.")
    adapter = _load(config, adapter)
    sites = _sites(adapter, config.site)
    _check_context(adapter, config.context_length)
    contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                               eval_fraction=config.eval_fraction, max_tokens=config.max_tokens, bos=bos_id(adapter))
    meta = {"model": adapter.name, "corpus": config.corpus, "split": config.split, "eval_fraction": config.eval_fraction,
            "context_length": config.context_length, "bos": adapter.bos, "versions": versions()}
    write_cache(ModelSource(adapter, contexts, sites, config.batch_contexts), out, meta, progress=config.progress)
    return CacheRun(out, int(contexts.numel()))


def format_cache(run: CacheRun) -> str:
    return f"cached {run.tokens} tokens"


# ----------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    """Settings of `featopt sae eval`."""

    model: str = "tiny-llama"
    bos: bool = False  # start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    sae: str = ""  # an SAE folder (SAELens, sparsify, Gemma Scope); several comma-separated
    corpus: str = ""
    split: str = "eval"  # eval (held out by `sae train`), train or all
    eval_fraction: float = 0.05
    context_length: int = 128
    contexts: int = 64
    batch_contexts: int = 8
    skip_first: int = 1
    dtype: str = "float32"
    out: str | None = None
    progress: bool = True


@dataclass
class EvalRun:
    metrics: list[dict]
    names: list[str]
    out: Path = field(default_factory=Path)


def run_eval(config: EvalConfig, adapter: ModelAdapter | None = None) -> EvalRun:
    from featopt.data import corpus_contexts
    from featopt.dictionaries.evaluate import evaluate
    from featopt.models.sae.formats import load_sae

    _check_positive(config, ("context_length", "contexts", "batch_contexts"))
    if config.skip_first < 0 or config.skip_first >= config.context_length:
        raise FeatoptError(f"--skip_first must be between 0 and {config.context_length - 1}, got {config.skip_first}.")
    if not config.sae:
        raise FeatoptError("--sae is required: give an SAE folder.")
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    paths = [p.strip() for p in config.sae.split(",") if p.strip()]
    saes = [load_sae(p) for p in paths]
    adapter = _load(config, adapter)
    for path, sae in zip(paths, saes):
        attach(adapter, sae, path)  # validates the site and its width
    _check_context(adapter, config.context_length)
    contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                               eval_fraction=config.eval_fraction, bos=bos_id(adapter))[: config.contexts]
    metrics = evaluate(adapter, saes, contexts, batch_size=config.batch_contexts, skip_first=config.skip_first,
                       progress=config.progress)
    out = _out(config.out)
    names = [Path(p).name for p in paths]
    document = {"run": {"command": "sae eval", "config": asdict(config), "model": adapter.name, "versions": versions()},
                "saes": [{"path": p, "hash": s.content_hash(), "metrics": m} for p, s, m in zip(paths, saes, metrics)]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2)))
    return EvalRun(metrics, names, out)


def format_eval(run: EvalRun) -> str:
    from featopt.dictionaries.evaluate import format_metrics

    return format_metrics(run.metrics, run.names)
