"""GCG-style search over N real tokens (Zou et al. 2023, "Greedy Coordinate Gradient"; the
`nanogcg` package): per step, the gradient of the objective w.r.t. a one-hot input picks the
top-k tokens per position, a batch of single (or `n_replace`) swaps is scored exactly in batched
inference-mode forwards that stop at the site, and each problem keeps the best it has seen.

Problems and scores are the greedy search's: the position field of `--features` must be `:`;
variant `last` scores the feature at the last position, `sum` the sum over every position (the
prefix's included), so GCG's and greedy's answers compare directly. Every problem of every site
is searched in the same batched run. `run(GCGConfig(...))` is the one entry point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.specs import Problem, parse_features
from featopt.models import ModelAdapter, Site
from featopt.results import FeatureResult, versions, write_results
from featopt.discrete.candidates import CandidateModel, prompt_xent
from featopt.discrete.common import DTYPES, SearchRun, format_table, load, out_dir, parse_candidates, per_position, sites_for, spawn
from featopt.discrete.greedy import position_weights
from featopt.discrete.swap_search import SwapSettings, SwapState, swap_search
from featopt.discrete.sweep import distributed
from featopt.discrete.tokens import ALLOW, allowed_ids, check_length

__all__ = ["GCGConfig", "SwapConfig", "FeatureLoss", "position_weights", "run", "format_table"]

VARIANTS = ("last", "sum")


@dataclass
class SwapConfig:
    """Settings GCG and EPO share (the flags of `featopt search gcg|epo`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # start the model input with its BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int | str = 0  # one layer, or several: "0,3,7" or "0-3"
    site: str = "resid_post"  # or several kinds, each at every layer
    features: str = "[:, :, 0-3]"  # the position field must be ":" (the variant decides)
    tokens: int | None = None  # N searched tokens; default 8, or the length of --init text
    variant: str = "last"  # last position, or sum over positions (as greedy)
    prefix: str | None = None  # fixed text before the searched tokens
    init: str = "random"  # "random" (seeded, allowed tokens), a text, or exact ids "ids:12,40,7"
    steps: int = 100
    search_width: int = 512  # candidates per problem and step
    topk: int = 256  # tokens per position that swaps are drawn from
    n_replace: int = 1  # positions swapped per candidate
    buffer_size: int = 4  # best distinct sequences kept per problem
    max_evaluations: int = 0  # stop once a problem has scored this many sequences (0: no limit)
    allow: str = "no-special"  # all, no-special or ascii
    candidates: str | None = None  # token ids allowed ("0-4095"); default: the whole vocabulary
    batch_size: int = 0  # candidates per forward; 0: automatic, halved on out-of-memory
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    devices: int = 1  # processes; each step's candidates are sharded across them
    out: str | None = None
    progress: bool = True
    sae: str | None = None  # an SAE folder: its latents are the features, at its own site
    isolated: bool = False  # the site's block alone (one layer, no prefix)


@dataclass
class GCGConfig(SwapConfig):
    """Settings of one GCG search (the flags of `featopt search gcg`)."""

    pool: bool = True  # score each candidate for every feature (one forward serves all); each keeps the best of all


class FeatureLoss:
    """Minus each problem's score, for candidates of mixed problems and sites.

    Args:
        plans: per site, its problems; problem ids count through the plans in order.
        weights: `[P, T]` per problem, the weight of each position of the whole sequence.
    """

    def __init__(self, plans: list[tuple[Site, list[Problem]]], widths: list[int], weights: Tensor):
        self.sites = [site for site, _ in plans]
        self.site_of = torch.cat([torch.full((len(ps),), i, dtype=torch.long) for i, (_, ps) in enumerate(plans)])
        self.local = torch.cat([torch.arange(len(ps)) for _, ps in plans])
        self.features = []  # per site: [P_site, W] averaging weights
        for (site, problems), width in zip(plans, widths):
            matrix = torch.zeros(len(problems), width, dtype=torch.float64)
            for p, problem in enumerate(problems):
                chosen = list(range(width)) if problem.features is None else list(problem.features)
                matrix[p, chosen] = 1.0 / len(chosen)
            self.features.append(matrix)
        self.weights = weights

    def score(self, acts: dict[Site, Tensor], problems: Tensor) -> Tensor:
        """`acts {site: [B, T, W]}`, `problems [B]` -> the weighted activation `[B]` (float32 or more)."""
        device = next(iter(acts.values())).device
        problems = problems.to(device)
        site_of = self.site_of.to(device)[problems]
        out = None
        for i, site in enumerate(self.sites):
            rows = (site_of == i).nonzero()[:, 0]
            if not len(rows):
                continue
            a = acts[site][rows]
            f = self.features[i].to(device, a.dtype)[self.local.to(device)[problems[rows]]]  # [b, W]
            reduced = torch.bmm(a, f[:, :, None])[..., 0]  # [b, T]
            value = (reduced * self.weights.to(device, a.dtype)[problems[rows]]).sum(dim=1)
            out = value.new_zeros(len(problems)) if out is None else out
            out = out.index_put((rows,), value.to(out.dtype))  # out of place: gradients flow
        return out

    def __call__(self, acts: dict[Site, Tensor], problems: Tensor) -> Tensor:
        return -self.score(acts, problems)

    def all(self, acts: dict[Site, Tensor]) -> Tensor:
        """Minus every problem's score of every sequence: `acts {site: [B, T, W]}` -> `[B, P]`
        (one matmul per site: the readout of a forward is cheap beside the forward)."""
        out = []
        for i, site in enumerate(self.sites):
            a = acts[site]
            mine = self.site_of == i
            f = self.features[i].to(a.device, a.dtype)  # [P_site, W]
            w = self.weights[mine].to(a.device, a.dtype)  # [P_site, T]
            out.append(-torch.einsum("btw,pw,pt->bp", a, f, w))
        return torch.cat(out, dim=1)


def check(config) -> None:
    """Flags shared by GCG and EPO, checked before any model is loaded."""
    for name in ("steps", "search_width", "topk", "n_replace", "buffer_size", "devices"):
        if getattr(config, name) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.tokens is not None and config.tokens < 1:
        raise FeatoptError(f"--tokens must be at least 1, got {config.tokens}.")
    for name in ("max_evaluations", "batch_size"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 (none) or more, got {getattr(config, name)}.")
    for name, allowed in (("variant", VARIANTS), ("allow", ALLOW), ("dtype", tuple(DTYPES))):
        if getattr(config, name) not in allowed:
            raise FeatoptError(f"--{name} {getattr(config, name)!r} is not known: allowed are {', '.join(allowed)}.")
    if not isinstance(config.init, str) or not config.init.strip():
        raise FeatoptError("--init is empty: give 'random' or a text to start from.")


def plan(config, adapter: ModelAdapter) -> list[tuple[Site, list[Problem]]]:
    plans = []
    for site in sites_for(adapter, config):
        problems = parse_features(config.features, width=adapter.width(site), site=str(site))
        if any(p.positions is not None for p in problems):
            raise FeatoptError(f"{config.features!r} names positions, but the searched positions are chosen by "
                               "--variant (last, or sum over all): write the position field as \":\".")
        plans.append((site, problems))
    return plans


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


class Trajectory:
    """TensorBoard scalars per step (rank 0): each row's best activation, under `tag(row)`."""

    def __init__(self, out: Path, tags: list[str]):
        self.tags, self.writer = tags, None
        if distributed()[0] == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def __call__(self, step: int, state: SwapState, evaluated) -> None:
        if self.writer is None:
            return
        for r, tag in enumerate(self.tags):
            self.writer.add_scalar(tag, state.trajectory[r][-1], step)
            if state.xent is not None:
                self.writer.add_scalar(tag.replace("/activation", "/xent"), float(state.xent[r]), step)
        self.writer.add_scalar("search/evaluations_per_problem", float(state.evaluations.float().mean()), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def measure(adapter: ModelAdapter, plans, ids: Tensor, variant: str, isolated: bool = False) -> tuple[Tensor, Tensor]:
    """Re-measured by plain forwards: per row, the activation `[R]` and its per-position values `[R, T]`."""
    acts, col = [], 0
    for site, problems in plans:
        rows = ids[col:col + len(problems)]
        acts.append(per_position(adapter, site, rows, [p.features for p in problems], isolated).double())
        col += len(problems)
    per_pos = torch.cat(acts)
    return (per_pos[:, -1] if variant == "last" else per_pos.sum(1)), per_pos


def run(config: GCGConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Search `config.tokens` tokens for every problem of every site; one result per (site,
    problem), site-major, written to `out/results.json` (TensorBoard scalars in `out/tensorboard`)."""
    check(config)
    if config.devices > 1 and distributed()[1] == 1:
        return spawn(run, config, adapter)
    adapter = load(config, adapter)
    plans = plan(config, adapter)
    allowed = allowed_ids(adapter, config.allow, parse_candidates(config.candidates, adapter.vocab_size))
    problems = [(site, p) for site, ps in plans for p in ps]
    prefix, init = start(config, adapter, allowed, len(problems))
    n_tokens = len(prefix) + init.shape[1]
    loss = FeatureLoss(plans, [adapter.width(s) for s, _ in plans], position_weights(config.variant, len(problems), n_tokens))
    if config.isolated and len({s.layer for s, _ in plans}) > 1:
        raise FeatoptError("--isolated runs one block alone: give one layer, not several.")
    model = CandidateModel(adapter, [s for s, _ in plans], loss, prefix, batch_size=config.batch_size,
                           isolated=config.isolated)
    out = out_dir(config)
    log = Trajectory(out, [f"gcg/{site}/{p.spec}/activation" for site, p in problems])
    try:
        state = swap_search(model, init, torch.arange(len(problems)), allowed.to(adapter.device),
                            settings_of(config, "gcg"), pool=config.pool and len(problems) > 1, on_step=log)
    finally:
        log.close()
    ids = torch.cat([prefix.cpu().expand(len(problems), -1), state.ids], dim=1)
    measured, per_pos = measure(adapter, plans, ids, config.variant, config.isolated)
    xent = prompt_xent(adapter, ids, len(prefix))
    results, stamp = [], versions()
    objective = f"maximize({{site}}, {'last position' if config.variant == 'last' else 'sum over positions'})"
    for r, (site, problem) in enumerate(problems):
        row = ids[r].tolist()
        buffer_ids, buffer_total = state.buffers[r]
        results.append(FeatureResult(
            spec=problem.spec, site=str(site), method="gcg", objective=objective.format(site=site),
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=float(measured[r]), model=adapter.name, bos=adapter.bos, seed=config.seed,
            feature_map=adapter.describe_features(site), dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"prefix_length": len(prefix), "per_position": per_pos[r].tolist(),
                   "search_activation": -float(state.loss[r]), "xent": float(xent[r]),
                   "forward_evaluations": int(state.evaluations[r]), "gradient_evaluations": state.steps_run,
                   "steps": state.steps_run, "trajectory": state.trajectory[r], "init_ids": init[r].tolist(),
                   "buffer": {"token_ids": buffer_ids.tolist(), "activations": (-buffer_total).tolist()}},
        ))
    if distributed()[0] == 0:
        meta = {"method": "gcg", "config": asdict(config), "model": adapter.name, "world_size": distributed()[1],
                "sites": [str(s) for s, _ in plans], "prefix_ids": prefix.tolist(), "allowed_tokens": len(allowed)}
        write_results(out, results, meta)
    return SearchRun(results, out)
