"""`featopt search exhaustive|greedy`: the sweeps over the vocabulary (source document 000).

Both score any objective (`--objective`, default maximize) exactly on real tokens, every problem
of every layer in the same batched sweep. `--devices K` runs K processes, each sweeping a shard.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import device_of, load_for, site_list
from featopt.commands.result import SearchRun
from featopt.commands.settings import DeviceSettings, InputSettings, OutputSettings, TargetSettings, UntrainedSettings
from featopt.commands.tables import feature_table
from featopt.commands.targets import objective_for, spec_positions_free
from featopt.discrete import exhaustive as exhaustive_method
from featopt.discrete import greedy as greedy_method
from featopt.discrete.tokens import check_length
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.objectives import stack
from featopt.results import read_results, write_plain_results, write_results
from featopt.runs.outdir import out_folder
from featopt.runs.processes import distributed, spawn
from featopt.specs import parse_candidates


@dataclass
class SearchSettings(OutputSettings, DeviceSettings, TargetSettings, UntrainedSettings, InputSettings):
    """What every discrete search takes."""

    model: str = "tiny-gpt2"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    prefix: str | None = None
    """fixed text before the searched tokens (after the BOS token of --bos)"""
    candidates: str | None = None
    """token ids to try ("0-4095", "17,42"); default: the whole vocabulary"""
    batch_size: int = 0
    """candidates per forward (0: automatic, halved on out-of-memory)"""


def check_search(config) -> None:
    """The flags every discrete search shares, checked before any model is loaded."""
    check_at_least(config, ["devices"])
    if config.batch_size < 0:
        raise FeatoptError(f"--batch_size must be 0 (automatic) or more, got {config.batch_size}.")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", config.device):
        raise FeatoptError(f"--device {config.device!r} is not known: allowed are auto, cpu, cuda, cuda:N, mps.")


def spawned(run, config, adapter: ModelAdapter | None) -> SearchRun:
    """`run(config, adapter)` in `config.devices` processes; rank 0's records, read back."""
    config = dataclasses.replace(config, out=str(out_folder(config.out)), device=device_of(config, adapter))
    spawn(run, config, adapter)
    _, results = read_results(config.out)
    return SearchRun(results, Path(config.out))


def run_meta(method: str, config, adapter: ModelAdapter, objective, **more) -> dict:
    """The `run` block of a search's results.json (`sites`: every site the objective reads)."""
    return {"method": method, "config": record_of(config), "model": adapter.name, "world_size": distributed()[1],
            "sites": [str(s) for s in objective.sites], "objective": objective.description, **more}


# ----------------------------------------------------------------------------- exhaustive
@dataclass
class ExhaustiveConfig(SearchSettings):
    """Settings of one exhaustive sweep (the flags of `featopt search exhaustive`)."""

    top_k: int = 10
    """best tokens kept per problem"""
    isolated: bool = False
    """the site's block alone, without the blocks before it (no prefix then)"""


def exhaustive(config: ExhaustiveConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Sweep the vocabulary once for every problem at every layer; one result per (site, problem),
    site-major, written to `out/results.json` (rank 0 with several processes; every rank returns them)."""
    check_search(config)
    check_at_least(config, ["top_k"])
    if config.devices > 1 and distributed()[1] == 1:
        return spawned(exhaustive, config, adapter)
    adapter = load_for(config, adapter)
    sites = site_list(adapter, config)
    prefix = adapter.encode(config.prefix)  # [BOS] alone when --bos and no prefix
    check_length(adapter, len(prefix), 1)
    if config.isolated and len(prefix):
        raise FeatoptError("--isolated cannot be combined with --prefix or --bos: a block alone cannot continue a cached prefix.")
    n_tokens = len(prefix) + 1
    objective = objective_for(config, adapter, sites, n_tokens=n_tokens)
    if config.isolated and len({site.layer for site in objective.sites}) > 1:
        raise FeatoptError("--isolated runs one block alone: give one layer, not several.")
    _check_candidate_position(objective, n_tokens)
    candidates = parse_candidates(config.candidates, adapter.vocab_size)
    k = min(config.top_k, adapter.vocab_size if candidates is None else len(candidates))
    topk = exhaustive_method.exhaustive(adapter, objective, prefix=prefix, candidates=candidates, k=k,
                                        batch_size=config.batch_size, isolated=config.isolated, progress=config.progress)
    results = exhaustive_method.records(adapter, objective, topk, prefix, seed=config.seed, isolated=config.isolated)
    out = out_folder(config.out)
    if distributed()[0] == 0:
        write_plain_results(out, results, run_meta("exhaustive", config, adapter, objective, prefix_ids=prefix.tolist()))
    return SearchRun(results, out)


def _check_candidate_position(objective, n_tokens: int) -> None:
    """A problem that reads only prefix positions scores every candidate the same."""
    from featopt.objectives.problems import parts, primary

    for part in parts(objective):
        sel = primary(part)
        for problem in sel.problems if sel is not None else ():
            if problem.positions is not None and n_tokens - 1 not in problem.positions:
                raise FeatoptError(f"{problem.spec} selects only prefix positions, which every candidate shares: "
                                   f"include position {n_tokens - 1}, the candidate token (or write \":\").")


# ----------------------------------------------------------------------------- greedy
@dataclass
class GreedyConfig(SearchSettings):
    """Settings of one greedy search (the flags of `featopt search greedy`)."""

    features: str = "[:, :, 0-3]"
    """feature spec; the position field must be ":" (--variant chooses the positions)"""
    tokens: int = 4
    """N, tokens to add"""
    variant: str = "last"
    """last position, sum over positions, or both (one run, shared rows)"""
    top_k: int = 5
    """best candidates kept per step (in results' extra)"""


class GreedyRun(SearchRun):
    def table(self) -> str:
        lines = [feature_table(self.results)]
        for site, c in greedy_method.agreement(self.results).items():
            lines.append(f"{site}: last and sum give the same tokens for {c['same_tokens']}/{c['problems']} problems, "
                         f"{c['same_positions']}/{c['positions']} positions")
        return "\n".join(lines)


def greedy(config: GreedyConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Grow `config.tokens` tokens greedily for every problem, layer and variant; one result per
    (site, variant, problem) in that order, written to `out/results.json`."""
    check_search(config)
    check_at_least(config, ["top_k", "tokens"])
    check_choice(config, "variant", greedy_method.VARIANTS)
    if config.devices > 1 and distributed()[1] == 1:
        found = spawned(greedy, config, adapter)
        return GreedyRun(found.results, found.out)
    adapter = load_for(config, adapter)
    spec_positions_free(config, "")
    variants = ["last", "sum"] if config.variant == "both" else [config.variant]
    parts, methods, sites = [], [], site_list(adapter, config)
    for site in sites:
        for variant in variants:
            part = objective_for(config, adapter, [site], over=variant)
            parts.append(part)
            methods += [f"greedy-{variant}"] * part.n_problems
    objective = stack(parts)
    candidates = parse_candidates(config.candidates, adapter.vocab_size)
    k = min(config.top_k, adapter.vocab_size if candidates is None else len(candidates))
    start = adapter.encode(config.prefix)  # [BOS] alone when --bos and no prefix
    check_length(adapter, len(start), config.tokens)
    seqs, steps = greedy_method.greedy(adapter, objective, start=start, tokens=config.tokens, candidates=candidates,
                                       k=k, batch_size=config.batch_size, progress=config.progress)
    results = greedy_method.records(adapter, objective, seqs, steps, start_length=len(start), methods=methods,
                                    seed=config.seed)
    out = out_folder(config.out)
    if distributed()[0] == 0:
        meta = run_meta("greedy", config, adapter, objective, prefix_ids=start.tolist())
        write_results(out, results, {**meta, "variant_agreement": greedy_method.agreement(results)})
    return GreedyRun(results, out)
