"""Output-matching inversion (source document 000, "Complete Search Features"): given real texts,
learn inputs whose outputs at a site match the texts' own outputs, `min ||O(e_n) - O(e)||_1` (or
the cosine of the flattened outputs), then decode them and count how many tokens came back.

Each text is one problem (one row). Texts of different lengths are right-padded with the pad (or
eos) token to the longest, and the padded positions are masked out of the objective and of every
metric: in a causal model they cannot change the activations of the positions before them.
`run(InversionConfig(...))` is the one entry point; `featopt invert` calls it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from featopt.runs import checkpoints
from featopt.cache import cache_dir
from featopt.gradient.decoding import nearest_decode, pinv_decoder, token_cosine
from featopt.errors import FeatoptError
from featopt.specs import Problem
from featopt.gradient.metrics import ExactMatch, OutputDistance, TokenRecovery, token_matches
from featopt.models import ModelAdapter, load_model, model_options
from featopt.gradient.ascent import PRECISIONS, trainer_for
from featopt.objectives.matching import OBJECTIVES, match
from featopt.gradient.module import FeatureOptimization
from featopt.runs.handle import ModelHandle
from featopt.runs.lightning import StepsDataModule
from featopt.objectives.objective import Context
from featopt.gradient.priors import PRIORS, SIMPLEX_MODES, make_parametrization
from featopt.gradient.readout import DECODERS, decode_ids
from featopt.objectives.targets import Selection
from featopt.results import FeatureResult, versions, write_results
from featopt.discrete.tokens import ALLOW

METHODS = ("gradient", "gcg")



@dataclass
class InversionConfig:
    """Settings of one inversion run (the flags of `featopt invert`)."""

    model: str = "tiny-llama"
    bos: bool = False  # run the model's BOS token before every text (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int = 0
    site: str = "resid_post"
    text: str | None = None  # one text to invert; `texts` adds more (all become one run)
    texts: list[str] | None = None
    objective: str = "l1"  # or "cosine": 1 - cos of the flattened outputs
    prior: str = "embedding"  # free embeddings, or "simplex": softmax over the vocabulary
    method: str = "gradient"  # or "gcg": a discrete search over real tokens (no decoding)
    steps: int = 600
    lr: float = 0.01  # with 600 steps: 90% of tokens on unseen sentences at layer 0 of SmolLM2 (0.05/300: 67%)
    decoder: str = "pinv"  # or "nearest": at layer 0 of SmolLM2 pinv 91% of tokens, nearest 55% (docs/reproductions.md); a simplex decodes by its own argmax
    temperature: float = 1.0  # simplex only: softmax temperature at the start ...
    temperature_end: float | None = None  # ... and at the end (None: constant)
    simplex_mode: str = "softmax"  # or "projected"
    isolated: bool = False
    untrained: bool = False
    seed: int = 0
    precision: str = "32-true"
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    out: str | None = None
    decode_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 0
    resume: str | None = None
    progress: bool = True
    search_width: int = 256  # gcg: candidates per text and step
    topk: int = 128  # gcg: tokens per position that swaps are drawn from
    n_replace: int = 1  # gcg: positions swapped per candidate
    allow: str = "all"  # gcg: all, no-special or ascii
    causal_topk: int = 4096  # gcg: candidates per position of the left-to-right pass before the swaps (0: none)
    batch_size: int = 0  # gcg: candidates per forward (0: automatic)


@dataclass
class Batch:
    """The texts as one padded batch: `ids [P, T]` (pad id after the end) and `mask [P, T]`."""

    texts: list[str]
    ids: Tensor
    mask: Tensor


@dataclass
class InversionRun:
    results: list[FeatureResult]
    metrics: dict[str, float]  # token_recovery, exact_match, distance, continuous_distance, counts
    out: Path
    module: FeatureOptimization | None  # None for --method gcg (no learnable input)
    trainer: L.Trainer | None


def texts_of(config: InversionConfig) -> list[str]:
    texts = ([config.text] if config.text is not None else []) + list(config.texts or [])
    if not texts:
        raise FeatoptError("no text to invert: give at least one --text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():  # whitespace alone is no text to recover
            raise FeatoptError(f"text {i + 1} is empty or only whitespace: every --text must hold visible text.")
    return texts


def _check(config: InversionConfig) -> None:
    if config.method not in METHODS:
        raise FeatoptError(f"--method {config.method!r} is not known: allowed are {', '.join(METHODS)}.")
    for name in ("steps", "devices", "decode_every", "log_every", "search_width", "topk", "n_replace"):
        if getattr(config, name) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    for name in ("lr", "temperature", "temperature_end"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise FeatoptError(f"--{name} must be positive, got {getattr(config, name)}.")
    for name, zero in (("batch_size", "automatic"), ("causal_topk", "no causal pass"), ("checkpoint_every", "never")):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 ({zero}) or more, got {getattr(config, name)}.")
    for name, allowed in (("allow", ALLOW), ("objective", OBJECTIVES), ("prior", PRIORS), ("decoder", DECODERS),
                          ("simplex_mode", SIMPLEX_MODES), ("precision", PRECISIONS)):
        if getattr(config, name) not in allowed:
            raise FeatoptError(f"--{name} {getattr(config, name)!r} is not known: allowed are {', '.join(allowed)}.")
    if config.resume and not Path(config.resume).is_file():
        raise FeatoptError(f"checkpoint {config.resume!r} to resume from does not exist.")


def encode_texts(adapter: ModelAdapter, texts: list[str]) -> Batch:
    """Tokenize (no special tokens) and right-pad to the longest text. With the run's `--bos` the
    BOS token is not part of the rows: it is run before them (`adapter.run(..., bos=True)`), a
    fixed token never recovered, but it takes a position, so the length check counts it."""
    rows = [adapter.encode(t, bos=False) for t in texts]
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise FeatoptError(f"text {i + 1} ({texts[i]!r}) encodes to no token: give text with at least one token.")
    longest = max(len(r) for r in rows)
    adapter.check_positions(longest + int(adapter.bos), f"a text of {longest} tokens", "shorten it")
    tok = adapter.tokenizer
    pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)) if t is not None), 0)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return Batch(texts, ids, mask)


def _parametrization(config: InversionConfig, adapter: ModelAdapter, problems: int, tokens: int):
    return make_parametrization(config.prior, adapter, problems, tokens, config.seed, temperature=config.temperature,
                                temperature_end=config.temperature_end, simplex_mode=config.simplex_mode)


def build(config: InversionConfig, adapter: ModelAdapter | None = None) -> tuple[FeatureOptimization, Batch]:
    """The LightningModule for `config` (validated) and the padded texts, without training."""
    _check(config)
    texts = texts_of(config)
    loader = functools.partial(load_model, config.model, untrained=config.untrained, seed=config.seed,
                               **model_options(config))
    adapter = loader() if adapter is None else adapter.with_bos(config.bos)  # a given model, with this run's --bos
    site = adapter.site(config.site, config.layer)
    batch = encode_texts(adapter, texts)
    with torch.no_grad():  # the target O(e): the real tokens' outputs, computed once
        target = adapter.run([site], input_ids=batch.ids, isolated=config.isolated, bos=adapter.bos)[site].float()
    objective = match(config.objective, site, target, batch.mask)
    # FeatureOptimization logs each row's mean activation over a selection: here all features at
    # the row's real positions, so the padding is left out of the logs too.
    n_tokens, width = batch.ids.shape[1], adapter.width(site)
    problems = [Problem(f"[:, 0:{n}, :]" if n > 1 else "[:, 0, :]", tuple(range(n)), None)
                for n in batch.mask.sum(dim=1).tolist()]
    selection = Selection(site, problems, n_tokens, width)
    parametrization = _parametrization(config, adapter, len(texts), n_tokens)
    # Spawned workers rebuild the model by name when it is the one the config names.
    handle = ModelHandle(adapter, loader if adapter.info is not None and adapter.info.name == config.model else None)
    module = FeatureOptimization(parametrization, objective, selection, handle, isolated=config.isolated, lr=config.lr)
    return module, batch


def _recovered(module: FeatureOptimization, batch: Batch, decoder: str) -> Tensor:
    """Decoded ids `[P, T]` with the pad id at padded positions (they are never scored)."""
    ids = decode_ids(module, decoder).cpu()
    return torch.where(batch.mask, ids, batch.ids)


class RecoveryCallback(L.Callback):
    """Every `every_n_steps` steps, decode and log token recovery and exact match to TensorBoard."""

    def __init__(self, batch: Batch, every_n_steps: int, decoder: str):
        self.batch, self.every, self.decoder = batch, max(1, every_n_steps), decoder

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step == trainer.max_steps or not trainer.is_global_zero or module.logger is None:
            return  # the last step is logged by run(), with the final metrics
        ids = _recovered(module, self.batch, self.decoder)
        recovery, exact = TokenRecovery(), ExactMatch()
        recovery.update(ids, self.batch.ids, self.batch.mask)
        exact.update(ids, self.batch.ids, self.batch.mask)
        module.logger.log_metrics({"inversion/token_recovery": float(recovery.compute()),
                                   "inversion/exact_match": float(exact.compute())}, step=step)


@torch.no_grad()
def evaluate(module: FeatureOptimization, batch: Batch, config: InversionConfig) -> tuple[list[FeatureResult], dict, Tensor]:
    """One result per text, the overall metrics, and the recovered ids `[P, T]` (pad id at padding)."""
    adapter, site, objective = module.adapter, module.selection.site, module.objective
    embedding = adapter.embedding
    embeds = module.parametrization(None).detach().to(embedding.device)
    # Both decodings are scored, so decoders can be compared on one run; a prior's own tokens
    # (a simplex's argmax) are the answer when it has them.
    decoded = {"pinv": pinv_decoder(embedding, cache_dir()).decode(embeds).cpu(), "nearest": nearest_decode(embedding, embeds).cpu()}
    direct = module.parametrization.direct_ids()
    ids = torch.where(batch.mask, direct.cpu() if direct is not None else decoded[config.decoder], batch.ids)
    cosine = token_cosine(embedding, embeds, ids).cpu()
    with torch.autocast(adapter.device.type, enabled=False):  # full precision, whatever the training ran in
        acts = adapter.run([site], input_ids=ids, isolated=module.isolated, bos=adapter.bos)[site].float()
        cont = adapter.run([site], inputs_embeds=embeds, isolated=module.isolated, bos=adapter.bos)[site].float()
    rows = torch.arange(len(batch.texts))
    distance = objective.loss(Context({site: acts}, embeds, rows, adapter)).cpu()
    cont_distance = objective.loss(Context({site: cont}, embeds, rows, adapter)).cpu()
    activation, cont_activation = module.selection.activation(acts, rows), module.selection.activation(cont, rows)
    correct, valid = token_matches(ids, batch.ids, batch.mask)
    recovery, exact, mean = TokenRecovery(), ExactMatch(), OutputDistance(config.objective)
    recovery.update(ids, batch.ids, batch.mask)
    exact.update(ids, batch.ids, batch.mask)
    mean.update(acts.cpu(), objective.target.cpu(), batch.mask)
    metrics = {"token_recovery": float(recovery.compute()), "exact_match": float(exact.compute()),
               "distance": float(mean.compute()), "continuous_distance": float(cont_distance.mean()),
               "tokens": int(valid.sum()), "tokens_recovered": int(correct.sum()),
               "texts": len(batch.texts), "texts_recovered": int((correct == valid).sum())}
    for name, alt in decoded.items():
        metrics[f"token_recovery_{name}"] = float(token_matches(alt, batch.ids, batch.mask)[0].sum()) / metrics["tokens"]
    stamp, results = versions(), []
    for p, text in enumerate(batch.texts):
        n = int(valid[p])
        row = ids[p, :n].tolist()
        results.append(FeatureResult(
            spec=text, site=str(site), method="output-matching-inversion", objective=objective.description,
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=float(activation[p]), continuous_activation=float(cont_activation[p]),
            token_cosine=[round(float(c), 6) for c in cosine[p, :n]], nearest_token_ids=decoded["nearest"][p, :n].tolist(),
            pinv_nearest_agreement=float((decoded["nearest"][p, :n] == decoded["pinv"][p, :n]).float().mean()),
            model=adapter.name, bos=adapter.bos, seed=config.seed, dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"original_token_ids": batch.ids[p, :n].tolist(), "token_recovery": int(correct[p]) / n,
                   "tokens_recovered": int(correct[p]), "exact_match": bool(correct[p] == n),
                   "distance": float(distance[p]), "continuous_distance": float(cont_distance[p]),
                   "decoded_by": "simplex-argmax" if direct is not None else config.decoder,
                   "pinv_token_ids": decoded["pinv"][p, :n].tolist()},
        ))
    return results, metrics, ids


def run(config: InversionConfig, adapter: ModelAdapter | None = None) -> InversionRun:
    """Invert every text at once; write `out/results.json` and `out/embeddings.safetensors`
    (`embeddings [P, T, d_model]`, recovered `token_ids [P, T]`, `original_ids`, `mask`).
    `--method gcg` searches real tokens instead (:mod:`featopt.discrete.inversion`)."""
    _check(config)
    if config.method == "gcg":
        from featopt.discrete import inversion

        return inversion.run(config, adapter)
    module, batch = build(config, adapter)
    out = Path(config.out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))
    if config.resume:
        checkpoints.check_resume(config.resume, module, "invert")
    trainer = trainer_for(config, out, (RecoveryCallback(batch, config.decode_every, config.decoder),), command="invert")
    L.seed_everything(config.seed, verbose=False)
    with checkpoints.resume_hint(out, config.checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(config.steps), ckpt_path=config.resume, weights_only=True)
    results, metrics = [], {}
    if trainer.is_global_zero:
        results, metrics, ids = evaluate(module, batch, config)
        if module.logger is not None:
            module.logger.log_metrics({f"inversion/{k}": metrics[k] for k in ("token_recovery", "exact_match", "distance")},
                                      step=trainer.global_step)
        meta = {"method": "output-matching-inversion", "config": asdict(config), "model": module.adapter.name,
                "site": str(module.selection.site), "objective": module.objective.description, "metrics": metrics}
        tensors = {"embeddings": module.parametrization(None).detach(), "token_ids": ids,
                   "original_ids": batch.ids, "mask": batch.mask}
        write_results(out, results, meta, tensors)
    return InversionRun(results, metrics, out, module, trainer)


def format_results(results: list[FeatureResult], metrics: dict) -> str:
    """Per text: original -> recovered and its token recovery; then the overall rates."""
    width = max((len(repr(r.spec)) for r in results), default=0)
    found = max((len(repr(r.text)) for r in results), default=0)
    lines = [f"{r.spec!r:<{width}}  ->  {r.text!r:<{found}}  tokens {r.extra['token_recovery']:.0%} "
             f"({r.extra['tokens_recovered']}/{len(r.token_ids)})" for r in results]
    lines.append(f"token recovery {metrics['token_recovery']:.1%} ({metrics['tokens_recovered']}/{metrics['tokens']} tokens), "
                 f"exact match {metrics['exact_match']:.1%} ({metrics['texts_recovered']}/{metrics['texts']} texts)")
    return "\n".join(lines)
