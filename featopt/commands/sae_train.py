"""`featopt sae train`: train SAEs and transcoders (several sizes, sites or layers from one pass of
the model, or from an activation cache: `sae_cache.py`) in SAELens' format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.settings import ContextSettings, OutputSettings, SeedSettings, TrainerSettings
from featopt.commands.loading import bos_id, check_context, handle_for, load_for
from featopt.commands.result import CommandResult
from featopt.commands.sae_sites import sizes as _sizes, site_list, targets as _targets
from featopt.commands.sae_eval import metrics_table
from featopt.dictionaries.optimizers import OPTIMIZERS, default_lr
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site, dtype_of
from featopt.models.sae import ARCHITECTURES, SAEConfig, architecture
from featopt.results import atomic_write, versions
from featopt.runs.lightning import PRECISIONS, resolve_strategy
from featopt.runs.outdir import out_folder


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig(OutputSettings, TrainerSettings, SeedSettings, ContextSettings):
    """Settings of `featopt sae train`."""

    site: str = "blocks.1.resid_post"
    """site(s) to read, e.g. blocks.6.resid_post (comma-separated: one SAE per site and size)"""
    corpus: str | None = None
    """a folder of .txt files (searched recursively) or one .txt file"""
    activations: str | None = None
    """train from this activation cache (featopt sae cache) instead of running the model"""
    architecture: str = "topk"
    """relu (L1 penalty), topk (k largest per token), batchtopk (k per token on average), matryoshka
    (batchtopk with nested prefixes) or jumprelu (learned thresholds, L0 penalty)"""
    target_site: str | None = None
    """train transcoders: the site each reconstructs from --site, e.g. --site blocks.6.mlp_in --target_site
    blocks.6.mlp_out (or a kind, mlp_out: each input site's layer)"""
    skip: bool = False
    """transcoders: add a linear skip connection x W_skip (skip transcoders)"""
    matryoshka: str = "0.0625,0.25,1"
    """matryoshka: the nested prefix sizes as fractions of d_sae, the last 1"""
    l0_coef: float = 1.0
    """jumprelu: weight of the L0 penalty, relative to the batch's variance"""
    bandwidth: float = 0.05
    """jumprelu: width of the straight-through estimator's kernel"""
    expansion: str = "4"
    """d_sae / d_in; a list such as 1,2,4,8 trains one SAE per size from one pass"""
    d_sae: str | None = None
    """number of latents instead of --expansion (a list trains several)"""
    k: int = 32
    """topk: latents kept per token"""
    l1: float = 5.0
    """relu: sparsity coefficient, relative to the batch's variance"""
    tokens: int = 2_000_000
    """training budget in tokens"""
    context_length: int = 128
    """tokens per context"""
    batch_size: int = 4096
    """tokens per optimizer step (the global batch, whatever --devices)"""
    buffer_batches: int = 16
    """batches drawn from one shuffled buffer of contexts"""
    optimizer: str = "signum"
    """signum (sparsify's default: schedule-free sign SGD, momentum 0.95, no schedule; the lower held-out
    FVU for every architecture at equal tokens, benchmarks/README.md) or adam (warm-up, decay)"""
    lr: float | None = None
    """learning rate (default per SAE: 2e-3 for signum, 2e-4 for adam, times 1 / sqrt(d_sae / 2^14))"""
    warmup_steps: int = 50
    """adam: linear learning-rate warm-up steps"""
    decay_fraction: float = 0.2
    """adam: linear decay to 0 over this last fraction of the steps"""
    normalize: bool = True
    """scale inputs to mean squared norm d_in (folded into the saved weights)"""
    auxk_alpha: float = 1 / 32
    """topk: weight of the AuxK loss on dead latents (0: off)"""
    dead_tokens: int = 500_000
    """a latent that has not fired for this many tokens is dead"""
    shard_latents: bool = False
    """split every SAE's latents over the --devices processes, for SAEs too wide for one (relu or topk)"""
    skip_first: int = 1
    """leading positions of every context left out (position 0: an attention sink)"""
    eval_fraction: float = 0.05
    """the last fraction of every document, held out from training"""
    eval_contexts: int = 64
    """held-out contexts evaluated at the end (0: none)"""
    eval_every: int = 0
    """also evaluate on them every N steps, to TensorBoard (0: at the end only)"""
    distribute_modules: bool = False
    """divide the SAEs among the processes (by parameter count), each training its own on the whole batch"""
    sae_device: str | None = None
    """train the SAEs on this device (cuda:1) and keep the model on another (the first other GPU, else the same):
    the next buffer's forward then runs during the SAE steps"""


@dataclass
class TrainRun(CommandResult):
    """The trained SAEs (raw-activation scale), where each was saved, their held-out metrics."""

    saes: list  # SparseAutoencoder
    paths: list[Path]
    metrics: list[dict]
    out: Path
    module: object = None
    trainer: object = None

    def table(self) -> str:
        lines = [f"saved: {p}" for p in self.paths]
        if self.metrics:
            lines.insert(0, metrics_table(self.metrics, [p.name for p in self.paths]))
        return "\n".join(lines)


def _check_train(config: TrainConfig) -> None:
    check_at_least(config, ["tokens", "context_length", "batch_size", "buffer_batches", "devices", "num_nodes", "log_every", "k"])
    if not architecture(config.architecture).trainable:
        trainable = [name for name, cls in ARCHITECTURES.items() if cls.trainable]
        raise FeatoptError(f"training {config.architecture} SAEs is not supported: train {' or '.join(trainable)} "
                           f"({config.architecture} SAEs load and run).")
    check_choice(config, "precision", PRECISIONS)
    check_choice(config, "optimizer", OPTIMIZERS)
    dtype_of(config.dtype)
    for name in ("l1", "auxk_alpha", "decay_fraction", "eval_fraction", "l0_coef"):
        value = getattr(config, name)
        if not (value >= 0 and value != float("inf")):
            raise FeatoptError(f"--{name} must be a finite number of at least 0, got {value}.")
    if config.decay_fraction > 1:
        raise FeatoptError(f"--decay_fraction must be between 0 and 1, got {config.decay_fraction}.")
    if not 0 < config.bandwidth < float("inf"):
        raise FeatoptError(f"--bandwidth must be positive and finite, got {config.bandwidth}.")
    if config.architecture == "matryoshka":
        fractions = _sizes(config.matryoshka, "--matryoshka")
        if fractions != sorted(set(fractions)) or fractions[-1] != 1:
            raise FeatoptError(f"--matryoshka {config.matryoshka!r} must be increasing fractions of d_sae ending at 1, "
                               "like 0.0625,0.25,1.")
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
    if config.sae_device and (config.distribute_modules or config.shard_latents or config.num_nodes > 1):
        raise FeatoptError("--sae_device places one process's SAEs: leave out --distribute_modules, --shard_latents "
                           "and --num_nodes.")
    if config.sae_device:
        from featopt.dictionaries.prefetch import split_devices

        split_devices(config.sae_device, config.accelerator, config.devices)  # a device that is not there: now
    if config.distribute_modules and getattr(config, "shard_latents", False):
        raise FeatoptError("--distribute_modules and --shard_latents divide the SAEs in two ways: give one of them.")
    if config.distribute_modules:  # a strategy that cannot leave the module unwrapped is refused here, before any run
        resolve_strategy(config.strategy, config.devices, config.accelerator, config.num_nodes, unwrapped=True)


def sae_configs(config: TrainConfig, adapter: ModelAdapter, sites: list[Site],
                targets: list[Site | None] | None = None) -> list[SAEConfig]:
    """One SAEConfig per (site, size), site-major; the architecture's own settings (topk's k) from
    the flags of the same names; a transcoder where `targets` names a site."""
    cls = architecture(config.architecture)
    out = []
    for site, target in zip(sites, targets or [None] * len(sites)):
        d_in = adapter.width(site)
        sizes = [int(d) for d in _sizes(config.d_sae, "--d_sae")] if config.d_sae else \
            [int(round(e * d_in)) for e in _sizes(config.expansion, "--expansion")]
        for d_sae in sizes:
            if "k" in cls.settings and config.k > d_sae:
                raise FeatoptError(f"--k {config.k} is more than the {d_sae} latents of the SAE: give k <= d_sae.")
            settings = {name: getattr(config, name) for name in cls.settings}
            if "matryoshka" in settings:
                settings["matryoshka"] = [max(1, round(f * d_sae)) for f in _sizes(config.matryoshka, "--matryoshka")]
            coder = {} if target is None else {"target_hook_name": target.name, "d_out": adapter.width(target),
                                               "apply_b_dec_to_input": False, "skip": config.skip}
            out.append(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=config.architecture, hook_name=site.name,
                                 model_name=adapter.name, metadata={}, **settings, **coder))
    return out


def train(config: TrainConfig, adapter: ModelAdapter | None = None) -> TrainRun:
    """Train every SAE of `config` from one stream of activations, save each in SAELens' format
    (in `out/` for one SAE, `out/<name>/` for several), evaluate them on held-out text."""
    import functools

    import lightning as L

    from featopt.data import corpus_contexts
    from featopt.dictionaries.activations import cached_source, model_source
    from featopt.dictionaries.prefetch import split_devices
    from featopt.dictionaries.train import HeldOutEval, SAETraining
    from featopt.runs import checkpoints
    from featopt.runs.lightning import StepsDataModule, end_distributed, make_trainer

    _check_train(config)
    adapter = load_for(config, adapter)
    sites = site_list(adapter, config.site)
    if not sites:
        raise FeatoptError("--site names no site: give one like blocks.6.resid_post.")
    check_context(adapter, config.context_length)
    targets = _targets(adapter, sites, config.target_site)
    if config.skip and config.target_site is None:
        raise FeatoptError("--skip adds a skip connection to transcoders: give --target_site too.")
    configs = sae_configs(config, adapter, sites, targets)
    if config.distribute_modules and len(configs) < (world := config.devices * config.num_nodes):
        raise FeatoptError(f"--distribute_modules gives each of the {world} processes an SAE, but this run trains {len(configs)}: "
                           f"give at least {world} SAEs (sites times sizes), or fewer --devices.")
    read = list(dict.fromkeys(sites + [t for t in targets if t is not None]))
    if config.activations:
        cache = cached_source(config.activations)  # read once; the stream reuses it
        missing = [s.name for s in read if s not in cache.sites]
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
        make_source = functools.partial(model_source, contexts=contexts, sites=read)
        corpus = config.corpus
    steps = -(-config.tokens // config.batch_size)
    # Spawned workers rebuild the model by name when it is the one the config names; training from
    # a cache needs no model at all.
    handle = None if config.activations else handle_for(config, adapter)
    from featopt.dictionaries.sharded import training_for  # --shard_latents: checked, then its own module and strategy
    training, settings = training_for(config, configs, default=SAETraining)
    model_device = None
    if config.sae_device:  # Lightning places the SAEs; the model stays on its own device (prefetch.py)
        accelerator, devices, model_device = split_devices(config.sae_device, config.accelerator, config.devices)
        settings = SimpleNamespace(**{**vars(settings), "accelerator": accelerator, "devices": devices})
    module = training(
        configs, handle, make_source, n_contexts=n_contexts, context_length=context_length,
        batch_tokens=config.batch_size, buffer_batches=config.buffer_batches, skip_first=config.skip_first,
        seed=config.seed, lrs=[config.lr or default_lr(config.optimizer, c.d_sae) for c in configs],
        warmup_steps=config.warmup_steps, decay_fraction=config.decay_fraction, l1=config.l1,
        auxk_alpha=config.auxk_alpha, dead_tokens=config.dead_tokens, normalize=config.normalize,
        optimizer=config.optimizer, l0_coef=config.l0_coef, bandwidth=config.bandwidth,
        distribute=config.distribute_modules, model_device=model_device,
    )
    out = out_folder(config.out)
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
    trainer = make_trainer(settings, out, max_steps=steps, callbacks=callbacks, progress=config.progress,
                           unwrapped=config.distribute_modules)
    L.seed_everything(config.seed, verbose=False)
    with checkpoints.resume_hint(out, config.checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(steps), ckpt_path=config.resume, weights_only=True)
    end_distributed()  # rank 0 evaluates alone: torchmetrics must not wait for the others
    if not trainer.is_global_zero:
        return TrainRun([], [], [], out, module, trainer)
    saes = [module.export(i) for i in range(len(configs))]
    metrics: list[dict] = []
    if held_out is not None:
        from featopt.dictionaries.density import plot_density
        from featopt.dictionaries.evaluate import evaluate

        metrics = evaluate(adapter.to(module.device), saes, held_out.to(adapter.device), skip_first=config.skip_first,
                           frequency=True)
    freqs = [row.pop("firing_frequency") for row in metrics]
    paths = _save_all(config, module, saes, metrics, adapter.name, corpus, steps, out)
    for path, freq, row in zip(paths, freqs, metrics):  # the latent density histogram beside each SAE
        plot_density(freq, path / "latent_density.png", title=f"latent density of {path.name}", tokens=row["tokens"])
    return TrainRun(saes, paths, metrics, out, module, trainer)


def _save_all(config: TrainConfig, module, saes: list, metrics: list[dict], model: str, corpus, steps: int,
              out: Path) -> list[Path]:
    """Save every SAE with its provenance (in `out/` for one, `out/<name>/` for several) and the
    run's `training.json`; the folders, in order."""
    paths = []
    stamp = versions()
    for i, sae in enumerate(saes):
        sae.cfg.metadata = {
            "trained_by": "featopt", "model": model, "corpus": str(corpus), "tokens": steps * config.batch_size,
            "seed": config.seed, "bos": config.bos, "precision": config.precision, "model_dtype": config.dtype,
            "input_scale_folded": float(module.scales[module.site_list.index(module.sites[i])]),
            "train_config": record_of(config), "versions": stamp,
            **({"held_out_metrics": metrics[i]} if metrics else {}),
        }
        path = out / module.sae_name(i) if len(saes) > 1 else out
        _save_into(sae, path)
        paths.append(path)
    document = {"run": {"command": "sae train", "config": record_of(config), "versions": stamp, "steps": steps,
                        "tokens": steps * config.batch_size},
                "saes": [{"path": str(p), "name": module.sae_name(i), "hash": saes[i].content_hash(),
                          **({"metrics": metrics[i]} if metrics else {})} for i, p in enumerate(paths)]}
    atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2)))
    return paths


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
