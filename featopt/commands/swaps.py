"""`featopt search gcg|epo`: gradient-guided swaps over N real tokens, for any objective.

GCG keeps each problem's best; EPO keeps, per problem, a population over fluency weights and the
Pareto front of score against the model's own cross-entropy of the input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.commands.fields import check_at_least, check_choice
from featopt.commands.loading import load_for, site_list
from featopt.commands.result import SearchRun
from featopt.commands.search import SearchSettings, check_search, run_meta, spawned
from featopt.commands.tables import feature_table
from featopt.commands.targets import objective_for, spec_positions_free
from featopt.discrete import epo as epo_method
from featopt.discrete import gcg as gcg_method
from featopt.objectives.problems import labels
from featopt.discrete.swap_search import SwapSettings
from featopt.discrete.tokens import ALLOW, allowed_ids, check_length
from featopt.discrete.trajectory import Trajectory
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.results import atomic_write, write_results
from featopt.runs.outdir import out_folder
from featopt.runs.processes import distributed
from featopt.specs import parse_candidates

VARIANTS = ("last", "sum")


@dataclass
class SwapSearchSettings(SearchSettings):
    """Settings GCG and EPO share (the flags of `featopt search gcg|epo`)."""

    features: str = "[:, :, 0-3]"
    """feature spec; the position field must be ":" (--variant chooses the positions)"""
    tokens: int | None = None
    """N searched tokens; default 8, or the length of the --init text"""
    variant: str = "last"
    """last position, or sum over positions (as greedy)"""
    init: str = "random"
    """"random" (seeded, allowed tokens), a text, or exact ids "ids:12,40,7\""""
    steps: int = 100
    """search steps"""
    search_width: int = 512
    """candidates per problem and step"""
    topk: int = 256
    """tokens per position that swaps are drawn from"""
    n_replace: int = 1
    """positions swapped per candidate"""
    buffer_size: int = 4
    """best distinct sequences kept per problem"""
    max_evaluations: int = 0
    """stop once a problem has scored this many sequences (0: no limit)"""
    allow: str = "no-special"
    """all, no-special or ascii"""
    isolated: bool = False
    """the site's block alone (one layer, no prefix)"""


def check_swaps(config) -> None:
    """Flags shared by GCG and EPO, checked before any model is loaded."""
    check_search(config)
    check_at_least(config, ["steps", "search_width", "topk", "n_replace", "buffer_size"])
    if config.tokens is not None and config.tokens < 1:
        raise FeatoptError(f"--tokens must be at least 1, got {config.tokens}.")
    if config.max_evaluations < 0:
        raise FeatoptError(f"--max_evaluations must be 0 (none) or more, got {config.max_evaluations}.")
    for name, allowed in (("variant", VARIANTS), ("allow", ALLOW)):
        check_choice(config, name, allowed)
    dtype_of(config.dtype)
    if not isinstance(config.init, str) or not config.init.strip():
        raise FeatoptError("--init is empty: give 'random' or a text to start from.")


def start(config, adapter: ModelAdapter, allowed: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """The prefix ids `[L]` and each row's first sequence `[rows, N]` (random allowed tokens under
    the seed, or the --init text's tokens)."""
    prefix = adapter.encode(config.prefix)  # [BOS] alone when --bos and no prefix
    if config.init == "random":
        n = config.tokens or 8
        gen = torch.Generator().manual_seed(config.seed)
        init = allowed[torch.randint(0, len(allowed), (rows, n), generator=gen)]
    else:
        ids = _init_ids(config.init, adapter) if config.init.startswith("ids:") else adapter.encode(config.init, bos=False)
        if len(ids) == 0:
            raise FeatoptError(f"--init {config.init!r} encodes to no token: give text or 'random'.")
        if config.tokens is not None and config.tokens != len(ids):
            raise FeatoptError(f"--init {config.init!r} is {len(ids)} tokens but --tokens is {config.tokens}: "
                               "give one of them, or make them agree.")
        init = ids[None].expand(rows, -1).clone()
    check_length(adapter, len(prefix), init.shape[1])
    return prefix, init


def _init_ids(init: str, adapter: ModelAdapter) -> Tensor:
    """`"ids:12,40,7"` -> those token ids (exact: re-encoding a decoded text need not give them back)."""
    try:
        ids = [int(t) for t in init[4:].split(",")]
    except ValueError:
        raise FeatoptError(f"--init {init!r} is malformed: write ids:12,40,7 (comma-separated token ids).") from None
    bad = [t for t in ids if not 0 <= t < adapter.vocab_size]
    if bad:
        raise FeatoptError(f"--init names token id {bad[0]}, outside the vocabulary (0-{adapter.vocab_size - 1}).")
    return torch.tensor(ids, dtype=torch.long)


def settings_of(config, desc: str) -> SwapSettings:
    return SwapSettings(steps=config.steps, search_width=config.search_width, topk=config.topk,
                        n_replace=config.n_replace, buffer_size=config.buffer_size,
                        max_evaluations=config.max_evaluations, seed=config.seed, progress=config.progress, desc=desc)


def prepare(config, adapter: ModelAdapter | None):
    """`(adapter, objective, sites, allowed, prefix, init)` of a swap search."""
    adapter = load_for(config, adapter)
    spec_positions_free(config, "")
    sites = site_list(adapter, config)
    objective = objective_for(config, adapter, sites, over=config.variant)
    if config.isolated and len({s.layer for s in objective.sites}) > 1:
        raise FeatoptError("--isolated runs one block alone: give one layer, not several.")
    allowed = allowed_ids(adapter, config.allow, parse_candidates(config.candidates, adapter.vocab_size))
    prefix, init = start(config, adapter, allowed, objective.n_problems)
    return adapter, objective, sites, allowed, prefix, init


# ----------------------------------------------------------------------------- gcg
@dataclass
class GCGConfig(SwapSearchSettings):
    """Settings of one GCG search (the flags of `featopt search gcg`)."""

    pool: bool = True
    """score each candidate for every feature (one forward serves all); each keeps the best of all"""


def gcg(config: GCGConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Search `config.tokens` tokens for every problem of every site; one result per (site,
    problem), site-major, written to `out/results.json` (TensorBoard scalars in `out/tensorboard`)."""
    check_swaps(config)
    if config.devices > 1 and distributed()[1] == 1:
        return spawned(gcg, config, adapter)
    adapter, objective, sites, allowed, prefix, init = prepare(config, adapter)
    out = out_folder(config.out)
    log = Trajectory(out, [f"gcg/{site}/{spec}/activation" for site, spec in labels(objective)])
    try:
        state = gcg_method.gcg(adapter, objective, prefix=prefix, init=init, allowed=allowed,
                               settings=settings_of(config, "gcg"), pool=config.pool, isolated=config.isolated,
                               batch_size=config.batch_size, on_step=log)
    finally:
        log.close()
    results = gcg_method.records(adapter, objective, state, prefix, init, seed=config.seed, isolated=config.isolated)
    if distributed()[0] == 0:
        write_results(out, results, run_meta("gcg", config, adapter, objective, prefix_ids=prefix.tolist(),
                                             allowed_tokens=len(allowed)))
    return SearchRun(results, out)


# ----------------------------------------------------------------------------- epo
@dataclass
class EPOConfig(SwapSearchSettings):
    """Settings of one EPO search (the flags of `featopt search epo`): GCG's, plus the lambdas."""

    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    """fluency weights, one population member each: member m minimizes loss + lambda_m * xent"""
    search_width: int = 128
    """candidates per member and step (a problem's pool is members x this)"""
    front_size: int = 64
    """most points reported per front (evenly spread along it; 1: the most active)"""
    pool: bool = False
    """score each candidate for every problem (its cross-entropy is shared): every member and front sees all"""
    likely: int = 0
    """members with lambda > 0 draw swaps among the model's own M likeliest tokens at each position, ranked by the
    gradient (0: among all tokens; featopt sae inputs uses 256)"""


class EPORun(SearchRun):
    def table(self) -> str:
        """The searches' table of the most active front point per problem, then each front from its
        most fluent point to its most active: `xent -> activation` and the text."""
        lines = [feature_table(self.results), ""]
        for r in self.results:
            lines.append(f"{r.site} {r.spec}: front of {len(r.extra['front'])} (xent nats/token, activation)")
            for q in sorted(r.extra["front"], key=lambda q: q["xent"]):
                lines.append(f"  {q['xent']:7.3f}  {q['activation']:9.4g}  {q['text']!r}")
        return "\n".join(lines)


def _check_epo(config: EPOConfig) -> None:
    check_swaps(config)
    lambdas = config.lambdas
    if not lambdas or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in lambdas):
        raise FeatoptError(f"--lambdas {lambdas!r} is not valid: give a list of finite, non-negative weights, "
                           "like [0, 0.5, 1, 2].")
    if len(set(lambdas)) != len(lambdas):
        raise FeatoptError(f"--lambdas {lambdas!r} repeats a weight: give distinct weights.")
    check_at_least(config, ["front_size"])
    check_at_least(config, ["likely"], low=0)


def epo(config: EPOConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Search every problem with one member per lambda; one result per (site, problem) holding its
    front (re-measured by plain forwards) and each member's answer; `out/fronts.json`, `out/fronts.png`."""
    _check_epo(config)
    if config.devices > 1 and distributed()[1] == 1:
        found = spawned(epo, config, adapter)
        return EPORun(found.results, found.out)
    adapter, objective, sites, allowed, prefix, init = prepare(config, adapter)
    epo_method.check_length(prefix, init)  # before anything is written
    out = out_folder(config.out)
    log = Trajectory(out, [f"epo/{site}/{spec}/lambda={v:g}/activation" for site, spec in labels(objective)
                           for v in config.lambdas])
    try:
        state, fronts = epo_method.epo(adapter, objective, prefix=prefix, init=init, allowed=allowed,
                                       settings=settings_of(config, "epo"), lambdas=list(config.lambdas),
                                       batch_size=config.batch_size, pool=config.pool, on_step=log,
                                       likely=[config.likely if v > 0 else 0 for v in config.lambdas])
    finally:
        log.close()
    results, document = epo_method.records(adapter, objective, state, fronts, prefix, lambdas=list(config.lambdas),
                                           front_size=config.front_size, seed=config.seed)
    if distributed()[0] == 0:
        meta = run_meta("epo", config, adapter, objective, prefix_ids=prefix.tolist(), allowed_tokens=len(allowed))
        write_results(out, results, meta)
        text = json.dumps({"run": meta, "fronts": document}, indent=2, ensure_ascii=False)
        atomic_write(out / "fronts.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        epo_method.plot_fronts(results, out / "fronts.png")
    return EPORun(results, out)
