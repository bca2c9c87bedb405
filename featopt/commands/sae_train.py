"""`featopt sae train`: train SAEs and transcoders (several sizes, sites or layers from one pass of
the model, or from an activation cache: `sae_cache.py`) in SAELens' format."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.settings import ContextSettings, OutputSettings, SeedSettings, TrainerSettings
from featopt.commands.loading import bos_id, check_context, handle_for, load_for
from featopt.commands.result import CommandResult
from featopt.commands.sae_eval import metrics_table
from featopt.dictionaries.optimizers import OPTIMIZERS, default_lr
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site, dtype_of
from featopt.models.sae import ARCHITECTURES, SAEConfig, architecture
from featopt.results import atomic_write, versions
from featopt.runs.lightning import PRECISIONS
from featopt.runs.outdir import out_folder


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


def site_list(adapter: ModelAdapter, site: str) -> list[Site]:
    """Sites of a comma-separated list; `blocks.A-B.KIND` is every layer from A to B (inclusive)."""
    names = []
    for item in (s.strip() for s in str(site).split(",") if s.strip()):
        match = re.match(r"^blocks\.(\d+)-(\d+)\.(.+)$", item)
        if match and int(match[1]) > int(match[2]):
            raise FeatoptError(f"site range {item!r} runs backwards: write blocks.A-B.KIND with A <= B.")
        names += [f"blocks.{layer}.{match[3]}" for layer in range(int(match[1]), int(match[2]) + 1)] if match else [item]
    return list(dict.fromkeys(adapter.site(name) for name in names))


def _targets(adapter: ModelAdapter, sites: list[Site], target: str | None) -> list[Site | None]:
    """The site each transcoder reconstructs, one per input site (None: SAEs): a kind (`mlp_out`,
    the input's own layer) or as many sites as `--site` gives."""
    if not target:
        return [None] * len(sites)
    if re.match(r"^[a-z_]+$", target.strip()):
        return [adapter.site(target.strip(), site.layer) for site in sites]
    targets = site_list(adapter, target)
    if len(targets) != len(sites):
        raise FeatoptError(f"--target_site names {len(targets)} sites for the {len(sites)} of --site: give one per input "
                           "site, or a kind such as mlp_out (the same layer as each).")
    return targets


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
    skip_first: int = 1
    """leading positions of every context left out (position 0: an attention sink)"""
    eval_fraction: float = 0.05
    """the last fraction of every document, held out from training"""
    eval_contexts: int = 64
    """held-out contexts evaluated at the end (0: none)"""
    eval_every: int = 0
    """also evaluate on them every N steps, to TensorBoard (0: at the end only)"""


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
    check_at_least(config, ["tokens", "context_length", "batch_size", "buffer_batches", "devices", "log_every", "k"])
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
    from featopt.dictionaries.train import HeldOutEval, SAETraining
    from featopt.runs import checkpoints
    from featopt.runs.lightning import StepsDataModule, make_trainer

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
    module = SAETraining(
        configs, handle, make_source, n_contexts=n_contexts, context_length=context_length,
        batch_tokens=config.batch_size, buffer_batches=config.buffer_batches, skip_first=config.skip_first,
        seed=config.seed, lrs=[config.lr or default_lr(config.optimizer, c.d_sae) for c in configs],
        warmup_steps=config.warmup_steps, decay_fraction=config.decay_fraction, l1=config.l1,
        auxk_alpha=config.auxk_alpha, dead_tokens=config.dead_tokens, normalize=config.normalize,
        optimizer=config.optimizer, l0_coef=config.l0_coef, bandwidth=config.bandwidth,
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
    trainer = make_trainer(config, out, max_steps=steps, callbacks=callbacks, progress=config.progress)
    L.seed_everything(config.seed, verbose=False)
    with checkpoints.resume_hint(out, config.checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(steps), ckpt_path=config.resume, weights_only=True)
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
