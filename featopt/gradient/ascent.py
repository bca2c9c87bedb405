"""Embedding ascent (source document 000): learn input embeddings that drive features towards a
large constant C, `e <- e - lr * grad ||C - O_f(e)||_1`, then decode by pseudoinverse.

`run(AscentConfig(...))` is the one entry point; the command line and recipes call it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from featopt.runs import checkpoints
from featopt.gradient.callbacks import DecodeCallback, TextProgressBar
from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter, load_model, model_options
from featopt.gradient.module import FeatureOptimization
from featopt.runs.handle import ModelHandle
from featopt.runs.lightning import PRECISIONS, StepsDataModule, resolve_strategy
from featopt.gradient.priors import make_parametrization
from featopt.gradient.readout import DECODERS, evaluate
from featopt.objectives.targets import Selection, l1_target, maximize
from featopt.results import FeatureResult, write_results
from featopt.models.sae.attach import attach_path

OBJECTIVES = ("l1", "maximize")


@dataclass
class AscentConfig:
    """Settings of one embedding-ascent run (the flags of `featopt optimize`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # run the model's BOS token before the optimized tokens (off: as the source documents)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int = 0
    site: str = "resid_post"
    features: str = "[:, :, 0-4]"
    tokens: int = 5
    steps: int = 200
    lr: float = 0.05
    target: float = 100.0  # C in ||C - O_f(e)||_1
    objective: str = "l1"  # or "maximize": minus the mean activation
    isolated: bool = False  # the site's block alone, without the blocks before it
    untrained: bool = False  # the model re-initialized from its config under `seed`
    init: str | None = None  # text to start from; None starts from random token-like embeddings
    prior: str = "embedding"  # free embeddings, or "simplex": softmax over the vocabulary, mapped through E
    temperature: float = 1.0  # simplex: softmax temperature at the start
    temperature_end: float | None = None  # simplex: temperature at the end (None: constant)
    simplex_mode: str = "softmax"  # simplex: "softmax" (logits) or "projected" (the documents' update)
    decoder: str = "pinv"  # or "nearest" (cosine)
    seed: int = 0
    precision: str = "32-true"
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"  # with devices > 1: ddp_spawn on CPU, ddp on GPU
    out: str | None = None  # default: featopt-runs/<time>
    decode_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no checkpoints
    resume: str | None = None  # a checkpoint to continue from
    progress: bool = True
    sae: str | None = None  # an SAE folder: its latents are the features, at its own site


@dataclass
class AscentRun:
    results: list[FeatureResult]
    out: Path
    module: FeatureOptimization
    trainer: L.Trainer


def _check(config: AscentConfig) -> None:
    for name in ("tokens", "steps", "devices", "decode_every", "log_every"):
        if getattr(config, name) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.checkpoint_every < 0:
        raise FeatoptError(f"--checkpoint_every must be 0 (never) or more, got {config.checkpoint_every}.")
    if config.lr <= 0:
        raise FeatoptError(f"--lr must be positive, got {config.lr}.")
    for name, allowed in (("precision", PRECISIONS), ("objective", OBJECTIVES), ("decoder", DECODERS)):
        if getattr(config, name) not in allowed:
            raise FeatoptError(f"--{name} {getattr(config, name)!r} is not known: allowed are {', '.join(allowed)}.")
    if config.resume and not Path(config.resume).is_file():
        raise FeatoptError(f"checkpoint {config.resume!r} to resume from does not exist.")


def build(config: AscentConfig, adapter: ModelAdapter | None = None) -> FeatureOptimization:
    """The LightningModule for `config` (validated), without training it."""
    _check(config)
    loader = functools.partial(load_model, config.model, untrained=config.untrained, seed=config.seed,
                               **model_options(config))
    adapter = loader() if adapter is None else adapter.with_bos(config.bos)  # a given model, with this run's --bos
    if config.sae:
        adapter, site = attach_path(adapter, config.sae)  # the handle carries the SAE to workers
    else:
        site = adapter.site(config.site, config.layer)
    from featopt.discrete.tokens import check_length  # lazy: the featopt.discrete package loads every search

    check_length(adapter, int(adapter.bos), config.tokens)
    problems = parse_features(config.features, n_tokens=config.tokens, width=adapter.width(site), site=str(site))
    selection = Selection(site, problems, config.tokens, adapter.width(site))
    objective = l1_target(selection, config.target) if config.objective == "l1" else maximize(selection)
    ids = None
    if config.init:
        ids = adapter.encode(config.init, bos=False)  # the free tokens; a BOS is run before them
        if len(ids) != config.tokens:
            raise FeatoptError(f"--init {config.init!r} is {len(ids)} tokens but --tokens is {config.tokens}: make them equal.")
    parametrization = make_parametrization(
        config.prior, adapter, len(problems), config.tokens, config.seed, init_ids=ids,
        temperature=config.temperature, temperature_end=config.temperature_end, simplex_mode=config.simplex_mode,
    )
    # Spawned workers rebuild the model by name when it is the one the config names.
    handle = ModelHandle(adapter, loader if adapter.info is not None and adapter.info.name == config.model else None)
    module = FeatureOptimization(parametrization, objective, selection, handle, isolated=config.isolated, lr=config.lr)
    return module


def trainer_for(config: AscentConfig, out: Path, extra_callbacks: tuple[L.Callback, ...] = (),
                command: str = "optimize") -> L.Trainer:
    """The Trainer for a run's settings. `config` is any config with AscentConfig's trainer fields
    (steps, precision, devices, accelerator, strategy, decode_every, decoder, log_every,
    checkpoint_every, progress); `extra_callbacks` are a method's own, added after the shared ones;
    `command` is stamped into the checkpoints."""
    strategy = resolve_strategy(config.strategy, config.devices, config.accelerator)
    callbacks = [DecodeCallback(config.decode_every, config.decoder), *extra_callbacks]
    if config.progress:
        callbacks.append(TextProgressBar())
    callbacks.extend(checkpoints.callbacks(command, out, config.checkpoint_every))
    return L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=strategy,
        precision=config.precision,
        max_steps=config.steps,
        logger=TensorBoardLogger(out, name="tensorboard", version=""),
        callbacks=callbacks,
        enable_checkpointing=bool(config.checkpoint_every),
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        log_every_n_steps=config.log_every,
        num_sanity_val_steps=0,
    )


def run(config: AscentConfig, adapter: ModelAdapter | None = None) -> AscentRun:
    """Optimize every problem of `config.features` at once; write and return the results.

    Results (one per problem, in spec order) go to `out/results.json` and
    `out/embeddings.safetensors` (`embeddings [problems, tokens, d_model]`, `token_ids [problems, tokens]`).
    """
    module = build(config, adapter)
    if config.resume:
        checkpoints.check_resume(config.resume, module, "optimize")
    out = Path(config.out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))
    trainer = trainer_for(config, out)
    L.seed_everything(config.seed, verbose=False)
    with checkpoints.resume_hint(out, config.checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(config.steps), ckpt_path=config.resume, weights_only=True)
    results: list[FeatureResult] = []
    if trainer.is_global_zero:
        method = "embedding-ascent" if config.prior == "embedding" else f"simplex-{config.simplex_mode}"
        results, ids = evaluate(module, method, decoder=config.decoder, seed=config.seed,
                                dtype=str(module.adapter.dtype).replace("torch.", ""))
        run_meta = {"method": method, "config": asdict(config), "model": module.adapter.name,
                    "site": str(module.selection.site), "objective": module.objective.description,
                    "feature_map": module.adapter.describe_features(module.selection.site)}
        tensors = {"embeddings": module.parametrization(None).detach(), "token_ids": ids}
        write_results(out, results, run_meta, tensors)
    return AscentRun(results, out, module, trainer)


def format_results(results: list[FeatureResult]) -> str:
    """One line per problem, like the documents' tables: spec, decoded text, activations."""
    width = max((len(r.spec) for r in results), default=0)
    lines = []
    for r in results:
        cont = f" (continuous {r.continuous_activation:.3g})" if r.continuous_activation is not None else ""
        lines.append(f"{r.spec:<{width}}  {r.text!r:<40}  activation {r.activation:.4g}{cont}")
    return "\n".join(lines)
