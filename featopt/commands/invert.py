"""`featopt invert`: recover texts from their outputs at a site (source document 000, "Complete
Search Features"): by gradients on a learnable input (`--method gradient`, decoded to tokens) or by
GCG over real tokens (`--method gcg`: a left-to-right causal pass, then swaps). Each text is one
problem; the objective is the distance of the input's outputs to the text's (`l1`, the documents',
or `cosine`), or an expression using them (`"l1 + 0.1 * maximize(features='[:, :, 3]')"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import handle_for, load_for
from featopt.commands.optimize import GradientSettings, check_gradient
from featopt.commands.result import CommandResult
from featopt.discrete import inversion as swap_inversion
from featopt.discrete.tokens import ALLOW, allowed_ids
from featopt.errors import FeatoptError
from featopt.gradient.ascent import train, trainer_for
from featopt.gradient.inversion import RecoveryCallback, evaluate
from featopt.gradient.module import FeatureOptimization
from featopt.gradient.priors import make_parametrization
from featopt.models import ModelAdapter, Site
from featopt.objectives import Defaults, Objective, Selection, Sum, parse_objective
from featopt.objectives.matching import DISTANCES, Batch, Match, check_texts, encode_texts, match
from featopt.results import FeatureResult, write_results
from featopt.runs.outdir import out_folder
from featopt.specs import Problem

METHODS = ("gradient", "gcg")


@dataclass
class InversionConfig(GradientSettings):
    """Settings of one inversion run (the flags of `featopt invert`)."""

    layer: int = 0
    """block index, 0-based (the documents' Block 1 is layer 0)"""
    site: str = "resid_post"
    """resid_post (default), resid_pre, attn_out, mlp_out, mlp_hidden, or blocks.L.KIND"""
    text: str | None = None
    """one text to invert (Python; on the command line --text adds to --texts)"""
    texts: list[str] | None = field(default=None, metadata={"repeat": "text"})
    """texts to invert, each one problem"""
    objective: str = "l1"
    """l1: ||O(e_n) - O(e)||_1 (the documents'), cosine: 1 - cos of the flattened outputs, or an expression using
    them (l1 + 0.1 * maximize(features='[:, :, 3]'))"""
    method: str = "gradient"
    """gradient (a learnable input, decoded) or gcg (a discrete search over real tokens)"""
    steps: int = 600
    """optimization (or gcg search) steps"""
    lr: float = 0.01
    """Adam learning rate (with 600 steps: 90% of tokens on unseen sentences at layer 0 of SmolLM2)"""
    search_width: int = 256
    """gcg: candidates per text and step"""
    topk: int = 128
    """gcg: tokens per position that swaps are drawn from"""
    n_replace: int = 1
    """gcg: positions swapped per candidate"""
    allow: str = "all"
    """gcg: all, no-special or ascii"""
    causal_topk: int = 4096
    """gcg: candidates per position of the left-to-right pass before the swaps (0: none)"""
    batch_size: int = 0
    """gcg: candidates per forward (0: automatic)"""


@dataclass
class InversionRun(CommandResult):
    results: list[FeatureResult]
    metrics: dict[str, float]  # token_recovery, exact_match, distance, continuous_distance, counts
    out: Path
    module: FeatureOptimization | None = None  # None for --method gcg (no learnable input)
    trainer: object = None
    record_name = "results.json"

    def table(self) -> str:
        """Per text: original -> recovered and its token recovery; then the overall rates."""
        results, metrics = self.results, self.metrics
        width = max((len(repr(r.spec)) for r in results), default=0)
        found = max((len(repr(r.text)) for r in results), default=0)
        lines = [f"{r.spec!r:<{width}}  ->  {r.text!r:<{found}}  tokens {r.extra['token_recovery']:.0%} "
                 f"({r.extra['tokens_recovered']}/{len(r.token_ids)})" for r in results]
        lines.append(f"token recovery {metrics['token_recovery']:.1%} ({metrics['tokens_recovered']}/{metrics['tokens']} "
                     f"tokens), exact match {metrics['exact_match']:.1%} ({metrics['texts_recovered']}/{metrics['texts']} texts)")
        return "\n".join(lines)


def texts_of(config: InversionConfig) -> list[str]:
    return check_texts(([config.text] if config.text is not None else []) + list(config.texts or []))


def _check(config: InversionConfig) -> None:
    check_choice(config, "method", METHODS)
    check_gradient(config)
    check_at_least(config, ["search_width", "topk", "n_replace"])
    for name, zero in (("batch_size", "automatic"), ("causal_topk", "no causal pass")):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 ({zero}) or more, got {getattr(config, name)}.")
    check_choice(config, "allow", ALLOW)


def objective_of(config: InversionConfig, adapter: ModelAdapter, site: Site, batch: Batch, target) -> Objective:
    """The run's objective: `l1`/`cosine` are the distances to the texts' outputs `target`."""
    if isinstance(config.objective, Objective):
        return config.objective.bind(adapter)
    extra = {kind: (lambda kind=kind: match(kind, site, target, batch.mask)) for kind in DISTANCES}
    defaults = Defaults(site=site, features="[:, :, :]", extra=extra)
    return parse_objective(config.objective, defaults).bind(adapter)


def _kind(objective: Objective) -> str:
    """The distance a run reports: its matching term's (l1 when it has none)."""
    terms = [term for _, term in objective.terms] if isinstance(objective, Sum) else [objective]
    return next((term.kind for term in terms if isinstance(term, Match)), "l1")


def build(config: InversionConfig, adapter: ModelAdapter | None = None) -> tuple[FeatureOptimization, Batch, object]:
    """The LightningModule for `config` (validated), the padded texts and their outputs, untrained."""
    _check(config)
    texts = texts_of(config)
    adapter = load_for(config, adapter, move=False)
    site = adapter.site(config.site, config.layer)
    batch = encode_texts(adapter, texts)
    with torch.no_grad():  # the target O(e): the real tokens' outputs, computed once
        target = adapter.run([site], input_ids=batch.ids, isolated=config.isolated, bos=adapter.bos)[site].float()
    objective = objective_of(config, adapter, site, batch, target)
    # FeatureOptimization logs each row's mean activation over a selection: here all features at
    # the row's real positions, so the padding is left out of the logs too.
    n_tokens, width = batch.ids.shape[1], adapter.width(site)
    problems = [Problem(f"[:, 0:{n}, :]" if n > 1 else "[:, 0, :]", tuple(range(n)), None)
                for n in batch.mask.sum(dim=1).tolist()]
    selection = Selection(site, problems, n_tokens, width)
    parametrization = make_parametrization(config.prior, adapter, len(texts), n_tokens, config.seed,
                                           temperature=config.temperature, temperature_end=config.temperature_end,
                                           simplex_mode=config.simplex_mode)
    module = FeatureOptimization(parametrization, objective, selection, handle_for(config, adapter),
                                 isolated=config.isolated, lr=config.lr)
    return module, batch, target


def invert(config: InversionConfig, adapter: ModelAdapter | None = None) -> InversionRun:
    """Invert every text at once; write `out/results.json` (and, for gradients,
    `out/embeddings.safetensors`: `embeddings [P, T, d_model]`, recovered `token_ids [P, T]`,
    `original_ids`, `mask`)."""
    _check(config)
    if config.method == "gcg":
        return _invert_gcg(config, adapter)
    module, batch, target = build(config, adapter)
    out = out_folder(config.out)
    kind = _kind(module.objective)
    trainer = trainer_for(config, out, (RecoveryCallback(batch, config.decode_every, config.decoder),), command="invert")
    train(module, trainer, steps=config.steps, seed=config.seed, out=out, checkpoint_every=config.checkpoint_every,
          resume=config.resume, command="invert")
    results, metrics = [], {}
    if trainer.is_global_zero:
        results, metrics, ids = evaluate(module, batch, target=target, kind=kind, decoder=config.decoder, seed=config.seed)
        if module.logger is not None:
            module.logger.log_metrics({f"inversion/{k}": metrics[k] for k in ("token_recovery", "exact_match", "distance")},
                                      step=trainer.global_step)
        meta = {"method": "output-matching-inversion", "config": record_of(config), "model": module.adapter.name,
                "site": str(module.selection.site), "objective": module.objective.description, "metrics": metrics}
        tensors = {"embeddings": module.parametrization(None).detach(), "token_ids": ids,
                   "original_ids": batch.ids, "mask": batch.mask}
        write_results(out, results, meta, tensors)
    return InversionRun(results, metrics, out, module, trainer)


def _invert_gcg(config: InversionConfig, adapter: ModelAdapter | None) -> InversionRun:
    texts = texts_of(config)
    if config.devices != 1:
        raise FeatoptError("--method gcg inverts in one process: drop --devices (featopt search gcg shards over devices).")
    if config.isolated:
        raise FeatoptError("--method gcg searches whole-model inputs: drop --isolated.")
    adapter = load_for(config, adapter, move=False)
    site = adapter.site(config.site, config.layer)
    batch = encode_texts(adapter, texts)
    with torch.inference_mode():
        target = adapter.run([site], input_ids=batch.ids, bos=adapter.bos)[site].float().clone()
    objective = objective_of(config, adapter, site, batch, target)
    how = swap_inversion.SwapInversion(
        objective=config.objective if config.objective in DISTANCES else None, steps=config.steps,
        search_width=config.search_width, topk=config.topk, n_replace=config.n_replace, causal_topk=config.causal_topk,
        batch_size=config.batch_size, seed=config.seed, progress=config.progress)
    out, allowed = out_folder(config.out), allowed_ids(adapter, config.allow)
    results, metrics = swap_inversion.invert(adapter, site, batch, target, objective, allowed, how, out)
    meta = {"method": "gcg-inversion", "config": record_of(config), "model": adapter.name, "site": str(site),
            "objective": objective.description, "metrics": metrics, "allowed_tokens": len(allowed)}
    write_results(out, results, meta)
    return InversionRun(results, metrics, out, None, None)
