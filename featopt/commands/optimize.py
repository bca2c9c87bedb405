"""`featopt optimize`: gradient ascent on input embeddings towards the objective (source document
000's `||C - O_f(e)||_1` by default), decoded by pseudoinverse, or a softmax-simplex prior."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import handle_for, load_for, site_list
from featopt.commands.result import SearchRun
from featopt.commands.settings import InputSettings, OutputSettings, TargetSettings, TrainerSettings, UntrainedSettings
from featopt.commands.tables import problem_lines
from featopt.commands.targets import objective_for
from featopt.discrete.tokens import check_length
from featopt.errors import FeatoptError
from featopt.gradient.ascent import train, trainer_for
from featopt.gradient.module import FeatureOptimization
from featopt.gradient.priors import PRIORS, SIMPLEX_MODES, make_parametrization
from featopt.gradient.readout import DECODERS, evaluate
from featopt.models import ModelAdapter
from featopt.objectives import Objective, Selection
from featopt.objectives.problems import primary
from featopt.results import write_results
from featopt.runs.lightning import PRECISIONS
from featopt.runs.outdir import out_folder
from featopt.specs import parse_features


@dataclass
class GradientSettings(OutputSettings, TrainerSettings, UntrainedSettings, InputSettings):
    """What the gradient methods share: their steps, learning rate, prior and decoder."""

    steps: int = 200
    """optimization steps"""
    lr: float = 0.05
    """Adam learning rate"""
    prior: str = "embedding"
    """embedding (free input embeddings, the documents' method) or simplex (softmax over the vocabulary)"""
    temperature: float = 1.0
    """simplex softmax temperature at the start"""
    temperature_end: float | None = None
    """simplex temperature at the end (default: constant)"""
    simplex_mode: str = "softmax"
    """softmax (free logits) or projected (the documents' softmax after every step)"""
    decoder: str = "pinv"
    """pinv (Moore-Penrose pseudoinverse) or nearest (cosine); a simplex decodes by its own argmax"""
    isolated: bool = False
    """run the block alone on the input, without the blocks before it"""
    decode_every: int = 50
    """decode and log the text every N steps"""


def check_gradient(config) -> None:
    """The flags every gradient run shares, checked before any model is loaded."""
    check_at_least(config, ["steps", "devices", "decode_every", "log_every"])
    if config.checkpoint_every < 0:
        raise FeatoptError(f"--checkpoint_every must be 0 (never) or more, got {config.checkpoint_every}.")
    for name in ("lr", "temperature", "temperature_end"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise FeatoptError(f"--{name} must be positive, got {value}.")
    for name, allowed in (("precision", PRECISIONS), ("decoder", DECODERS), ("prior", PRIORS),
                          ("simplex_mode", SIMPLEX_MODES)):
        check_choice(config, name, allowed)
    if config.resume and not Path(config.resume).is_file():
        raise FeatoptError(f"checkpoint {config.resume!r} to resume from does not exist.")


@dataclass
class AscentConfig(TargetSettings, GradientSettings):
    """Settings of one embedding-ascent run (the flags of `featopt optimize`)."""

    model: str = "tiny-gpt2"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    layer: int = 0
    """block index, 0-based (the documents' Block 1 is layer 0)"""
    objective: str = "l1"
    """what each problem scores: l1 (the documents' ||C - O_f(e)||_1, C = --target), maximize, or an expression
    such as "l1_target(C=100) - 0.5 * maximize(site='blocks.2.mlp_out', features='[:, :, 3]')" (docs/extending.md)"""
    tokens: int = 5
    """number of input tokens"""
    init: str | None = None
    """start from the embeddings of this text instead of random ones"""


class AscentRun(SearchRun):
    record_name = "results.json"

    def table(self) -> str:
        return problem_lines(self.results)


def build(config: AscentConfig, adapter: ModelAdapter | None = None) -> FeatureOptimization:
    """The LightningModule for `config` (validated), without training it."""
    check_gradient(config)
    check_at_least(config, ["tokens"])
    adapter = load_for(config, adapter, move=False)
    site = site_list(adapter, config)[0]
    check_length(adapter, int(adapter.bos), config.tokens)
    objective = objective_for(config, adapter, [site], n_tokens=config.tokens)
    # What is measured and logged per problem: the objective's own selection when it was given as
    # a value (the Python API), else --features at the site.
    selection = primary(objective) if isinstance(config.objective, Objective) else None
    if selection is None:
        problems = parse_features(config.features, n_tokens=config.tokens, width=adapter.width(site), site=str(site))
        selection = Selection(site, problems, config.tokens, adapter.width(site))
    ids = None
    if config.init:
        ids = adapter.encode(config.init, bos=False)  # the free tokens; a BOS is run before them
        if len(ids) != config.tokens:
            raise FeatoptError(f"--init {config.init!r} is {len(ids)} tokens but --tokens is {config.tokens}: make them equal.")
    parametrization = make_parametrization(
        config.prior, adapter, len(selection), config.tokens, config.seed, init_ids=ids,
        temperature=config.temperature, temperature_end=config.temperature_end, simplex_mode=config.simplex_mode,
    )
    return FeatureOptimization(parametrization, objective, selection, handle_for(config, adapter),
                               isolated=config.isolated, lr=config.lr)


def optimize(config: AscentConfig, adapter: ModelAdapter | None = None) -> AscentRun:
    """Optimize every problem of `config.features` at once; write and return the results.

    Results (one per problem, in spec order) go to `out/results.json` and
    `out/embeddings.safetensors` (`embeddings [problems, tokens, d_model]`, `token_ids [problems, tokens]`).
    """
    module = build(config, adapter)
    out = out_folder(config.out)
    trainer = trainer_for(config, out)
    train(module, trainer, steps=config.steps, seed=config.seed, out=out, checkpoint_every=config.checkpoint_every,
          resume=config.resume)
    results = []
    if trainer.is_global_zero:
        method = "embedding-ascent" if config.prior == "embedding" else f"simplex-{config.simplex_mode}"
        results, ids = evaluate(module, method, decoder=config.decoder, seed=config.seed,
                                dtype=str(module.adapter.dtype).replace("torch.", ""))
        run_meta = {"method": method, "config": record_of(config), "model": module.adapter.name,
                    "site": str(module.selection.site), "objective": module.objective.description,
                    "feature_map": module.adapter.describe_features(module.selection.site)}
        tensors = {"embeddings": module.parametrization(None).detach(), "token_ids": ids}
        write_results(out, results, run_meta, tensors)
    return AscentRun(results, out, trainer=trainer, module=module)
