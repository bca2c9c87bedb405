"""The exhaustive sweep against a bare forward (issue 13): its throughput, and `exhaustive.run` end to end.

For one layer L of a model, three timings over the whole vocabulary (every token id as a one-token
input, `[batch, 1]` input_ids, the same batches everywhere):

- **bare**: a plain HF forward of the model cut after the site: the base model (no LM head) with
  its decoder blocks truncated to `0..L` (a shallow copy sharing the weights), under
  `torch.inference_mode()`, reading `last_hidden_state`. HF applies the final norm to the last
  hidden state: one RMS/LayerNorm of `[batch, 1, d]`, negligible against a block, and kept so the
  baseline is the unmodified HF module.
- **sweep**: `featopt.discrete.sweep.sweep` scoring every feature of `blocks.L.resid_post` (d problems,
  `[:, :, 0-(d-1)]`, k=10 as `exhaustive` uses by default): the forward (early exit at the site)
  plus the scoring and the running top-k. Its throughput ratio is `bare / sweep` (1.0: free).
- **end to end**: `exhaustive.run` for the same features, from the call to `results.json` written
  in a temporary folder (the model is loaded beforehand and passed in: the baseline is a forward,
  not a load). Its ratio is `bare / end to end`.

Each repeat times all three, in an order alternated from one repeat to the next (bare, sweep, run,
then run, sweep, bare) so that drifting load on a shared machine falls on both sides; an untimed
warm-up of each on two batches comes first. Reported: the median seconds of each and the median of the per-repeat
ratios. The sweep's top-1 token of every feature is asserted equal to the run's.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/sweep_throughput.py --layers 0,15 --threads 2
    FEATOPT_MODEL_PATH=../shared/models python benchmarks/sweep_throughput.py --layers 0,15 --threads 2 --interleaved 8
    FEATOPT_MODEL_PATH=../shared/models python benchmarks/sweep_throughput.py --layers 0 --threads 2 --paired 8

`--paired` (`paired`) times each batch's bare forward beside the sweep's forward of the same batch,
inside the sweep: the steadiest of the three on a VM whose speed drifts between whole runs.

`measure(adapter, layer)` is importable (`from sweep_throughput import measure` with benchmarks/ on
`sys.path`), and used by bench_search.py for its sweep-vs-bare column.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import featopt
from featopt.specs import parse_features
from featopt.models import ModelAdapter, load_model
from featopt.commands.search import ExhaustiveConfig, exhaustive
from featopt.discrete.objective_scoring import sweep_scorers
from featopt.objectives import Selection, maximize
from featopt.discrete.sweep import sweep

__all__ = ["measure", "interleaved", "paired", "truncated", "bare_forward", "main"]



def sweep_scorer(adapter: ModelAdapter, site, problems):
    """The sweep's scorer for maximizing `problems` at `site` on one-token inputs: the fast path
    `featopt search exhaustive` takes for a plain maximize (checked to be the fast one)."""
    (found_site, scorer), = sweep_scorers(maximize(Selection(site, problems)).bind(adapter), adapter, 1)
    assert found_site == site, "a plain maximize must take the sweep's fast path"
    return scorer

def truncated(adapter: ModelAdapter, layer: int) -> nn.Module:
    """The adapter's HF base model (embeddings, blocks, final norm; no LM head) with its blocks cut to
    `0..layer`: a shallow copy, the weights are shared and the adapter's model is left untouched."""
    base = adapter.base
    cut = copy.copy(base)
    cut._modules = dict(base._modules)  # copy.copy shares the dict: replace it before assigning
    blocks = adapter.blocks
    if not isinstance(blocks, nn.ModuleList) or not any(m is blocks for m in base._modules.values()):
        raise ValueError(f"{adapter.name}: its blocks are not a ModuleList directly under the base model")
    name = next(n for n, m in base._modules.items() if m is blocks)
    cut._modules[name] = nn.ModuleList(list(blocks)[:layer + 1])
    return cut


@torch.inference_mode()
def bare_forward(model: nn.Module, candidates: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """`candidates [V]` as `[batch, 1]` input_ids through `model`, batch by batch: the plain forward,
    nothing kept but the last batch's `last_hidden_state`."""
    out = None
    for i in range(0, len(candidates), batch):
        out = model(input_ids=candidates[i:i + batch, None], use_cache=False).last_hidden_state
    return out


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(adapter: ModelAdapter, layer: int, repeats: int = 3, batch: int = 512) -> dict:
    """Bare forward vs sweep vs `exhaustive.run` for all d features of `blocks.layer.resid_post` over
    the whole vocabulary (see the module docstring).

    Returns `{"layer", "bare_s", "sweep_s", "run_s"` (median seconds), `"sweep_ratio"`, `"run_ratio"`
    (medians of the per-repeat `bare / sweep` and `bare / run`: throughput relative to the bare
    forward, 1.0 = as fast), `"bare_all", "sweep_all", "run_all"` (every timing, in repeat order),
    `"load"` (the 1, 5 and 15-minute load averages before and after; None where unknown)`}`.
    """
    site = adapter.site("resid_post", layer)
    d = adapter.width(site)
    spec = f"[:, :, 0-{d - 1}]"
    candidates = torch.arange(adapter.vocab_size, device=adapter.device)
    model = truncated(adapter, layer)
    problems = parse_features(spec, n_tokens=1, width=d)
    scorer = sweep_scorer(adapter, site, problems)  # as `featopt search exhaustive` builds it
    k = ExhaustiveConfig.top_k
    times: dict[str, list[float]] = {"bare": [], "sweep": [], "run": []}
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        config = ExhaustiveConfig(model=adapter.name, layer=layer, features=spec, top_k=k,
                                             batch_size=batch, progress=False, out=os.path.join(tmp, "run"),
                                             dtype=str(adapter.dtype).replace("torch.", ""),
                                             device=str(adapter.device))
        tops = {"sweep": [], "run": []}

        def one(what: str, warm: bool = False) -> float:
            ids = candidates[:2 * batch] if warm else candidates  # the warm-up: two batches
            if what == "bare":
                return _timed(lambda: bare_forward(model, ids, batch))[0]
            if what == "sweep":
                t, topk = _timed(lambda: sweep(adapter, [(site, scorer)], candidates=ids if warm else None, k=k,
                                               batch_size=batch, progress=False))
                tops["sweep"].append(topk.ids[0].tolist())
                return t
            c = dataclasses.replace(config, candidates=f"0-{len(ids) - 1}") if warm else config
            t, result = _timed(lambda: exhaustive(c, adapter))
            assert (result.out / "results.json").exists()
            tops["run"].append([r.token_ids[-1] for r in result.results])
            return t

        for what in times:  # warm-up (first calls: imports, allocations), untimed
            one(what, warm=True)
        tops["sweep"].clear(), tops["run"].clear()
        for i in range(repeats):
            for what in (list(times) if i % 2 == 0 else list(times)[::-1]):
                times[what].append(one(what))
        assert all(t == tops["sweep"][0] for t in tops["sweep"] + tops["run"]), \
            f"layer {layer}: the sweep's and the run's best tokens differ"
    med = statistics.median
    return {
        "layer": layer, "bare_s": med(times["bare"]), "sweep_s": med(times["sweep"]), "run_s": med(times["run"]),
        "sweep_ratio": med(b / s for b, s in zip(times["bare"], times["sweep"])),
        "run_ratio": med(b / r for b, r in zip(times["bare"], times["run"])),
        "bare_all": times["bare"], "sweep_all": times["sweep"], "run_all": times["run"],
        "load": (load_before, _load()),
    }


def interleaved(adapter: ModelAdapter, layer: int, tokens: int = 4096, repeats: int = 8, batch: int = 512) -> dict:
    """Bare forward and sweep alternated `repeats` times on the same `tokens` candidates (ids 5000
    on; 0: the whole vocabulary, the real workload): on a VM whose speed drifts by tens of percent between minutes, neighbours in time see the
    same machine. Returns `{"layer", "bare", "sweep"` (seconds per repeat), `"median_ratio"`,
    `"ratio_of_sums"` (bare / sweep)`}`."""
    site = adapter.site("resid_post", layer)
    d = adapter.width(site)
    problems = parse_features(f"[:, :, 0-{d - 1}]", n_tokens=1, width=d)
    scorer = sweep_scorer(adapter, site, problems)  # as `featopt search exhaustive` builds it
    ids = torch.arange(5000, 5000 + tokens) if tokens else torch.arange(adapter.vocab_size)
    model, ids = truncated(adapter, layer), ids.to(adapter.device)
    k = ExhaustiveConfig.top_k
    bare, swept, bare_cpu, swept_cpu = [], [], [], []
    pair = ((bare, bare_cpu, lambda: bare_forward(model, ids, batch)),
            (swept, swept_cpu, lambda: sweep(adapter, [(site, scorer)], candidates=ids, k=k, batch_size=batch,
                                             progress=False)))
    for i in range(repeats):  # bare first, then sweep first: neither always follows the other
        for times, cpu, fn in (pair if i % 2 == 0 else pair[::-1]):
            c0 = time.process_time()
            times.append(_timed(fn)[0])
            cpu.append(time.process_time() - c0)
    # CPU seconds of this process (all its threads): what the code costs, whatever else the
    # machine runs at the time (wall time on this VM drifts by tens of percent between minutes).
    return {"layer": layer, "bare": bare, "sweep": swept, "bare_cpu": bare_cpu, "sweep_cpu": swept_cpu,
            "median_ratio": statistics.median(b / s for b, s in zip(bare, swept)),
            "ratio_of_sums": sum(bare) / sum(swept),
            "cpu_median_ratio": statistics.median(b / s for b, s in zip(bare_cpu, swept_cpu)),
            "cpu_ratio_of_sums": sum(bare_cpu) / sum(swept_cpu)}


def paired(adapter: ModelAdapter, layer: int, repeats: int = 4, batch: int = 512) -> dict:
    """Bare forward and sweep paired batch by batch over the whole vocabulary: inside a sweep, each
    batch's bare forward runs next to the sweep's own forward of that batch (before it on even
    batches, after it on odd ones), timed apart. The sweep's time is its wall time less those bare
    forwards, so both sides of the ratio are summed over the same ~0.1 s windows and the VM's drift
    from one second to the next falls on both alike. (Whole-run alternation, `interleaved`, pairs
    3-second runs, and this VM's speed moves by 10-15% between them.)

    Returns `{"layer", "bare", "sweep"` (seconds per repeat), `"ratios"` (bare / sweep per repeat),
    `"median_ratio"`, `"ratio_of_sums"`}`; each repeat's top-1 tokens are asserted equal to the
    first's."""
    site = adapter.site("resid_post", layer)
    d = adapter.width(site)
    problems = parse_features(f"[:, :, 0-{d - 1}]", n_tokens=1, width=d)
    scorer = sweep_scorer(adapter, site, problems)  # as `featopt search exhaustive` builds it
    model, k = truncated(adapter, layer), ExhaustiveConfig.top_k
    inner = adapter.run
    bare_s: list[float] = []

    def run_beside(sites, *, input_ids, **kwargs):
        first = len(bare_s) % 2 == 0
        if first:
            bare_s.append(_timed(lambda: bare_forward(model, input_ids[:, 0], len(input_ids)))[0])
        out = inner(sites, input_ids=input_ids, **kwargs)
        if not first:
            bare_s.append(_timed(lambda: bare_forward(model, input_ids[:, 0], len(input_ids)))[0])
        return out

    bare, swept, tops = [], [], []
    adapter.run = run_beside  # an instance attribute: the class's method is untouched
    try:
        for i in range(repeats + 1):  # the first, untimed: warm-up
            bare_s.clear()
            t, topk = _timed(lambda: sweep(adapter, [(site, scorer)], k=k, batch_size=batch, progress=False))
            if i:
                bare.append(sum(bare_s))
                swept.append(t - sum(bare_s))
                tops.append(topk.ids[0].tolist())
    finally:
        del adapter.run
    assert all(t == tops[0] for t in tops), f"layer {layer}: the sweep's best tokens differ between repeats"
    ratios = [b / s for b, s in zip(bare, swept)]
    return {"layer": layer, "bare": bare, "sweep": swept, "ratios": ratios,
            "median_ratio": statistics.median(ratios), "ratio_of_sums": sum(bare) / sum(swept)}


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _load_avg() -> str:
    load = _load()
    return "load average unknown" if load is None else "load average %.2f, %.2f, %.2f" % load


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name (from FEATOPT_MODEL_PATH)")
    p.add_argument("--layers", default="0", help="comma-separated layers")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per layer (medians reported)")
    p.add_argument("--batch", type=int, default=512, help="token ids per forward")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--interleaved", type=int, default=0,
                   help="instead: bare and sweep alternated this many times (see `interleaved`)")
    p.add_argument("--tokens", type=int, default=4096, help="with --interleaved: token ids per repeat (0: the whole vocabulary)")
    p.add_argument("--paired", type=int, default=0,
                   help="instead: this many sweeps, each batch's bare forward timed beside it (see `paired`)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from FEATOPT_MODEL_PATH only, never the hub
    adapter = load_model(args.model)
    print(f"featopt from {os.path.dirname(featopt.__file__)}")
    print(f"{adapter.name}: {adapter.n_layers} blocks, d={adapter.d_model}, vocab {adapter.vocab_size}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {adapter.dtype}, {adapter.device}; batch "
          f"{args.batch}, {args.repeats} repeats; {_load_avg()}", flush=True)
    if args.paired:
        for layer in (int(x) for x in args.layers.split(",")):
            r = paired(adapter, layer, repeats=args.paired, batch=args.batch)
            print(f"layer {layer}: bare {', '.join(f'{t:.2f}' for t in r['bare'])}; sweep "
                  f"{', '.join(f'{t:.2f}' for t in r['sweep'])} s; sweep/bare {', '.join(f'{x:.3f}' for x in r['ratios'])}"
                  f"; median {r['median_ratio']:.3f}, ratio of sums {r['ratio_of_sums']:.3f}", flush=True)
        return
    if args.interleaved:
        for layer in (int(x) for x in args.layers.split(",")):
            r = interleaved(adapter, layer, tokens=args.tokens, repeats=args.interleaved, batch=args.batch)
            print(f"layer {layer}: bare {', '.join(f'{t:.2f}' for t in r['bare'])}; sweep "
                  f"{', '.join(f'{t:.2f}' for t in r['sweep'])} s; sweep/bare median {r['median_ratio']:.3f}, "
                  f"ratio of sums {r['ratio_of_sums']:.3f}; CPU time: bare {', '.join(f'{t:.2f}' for t in r['bare_cpu'])}; "
                  f"sweep {', '.join(f'{t:.2f}' for t in r['sweep_cpu'])} s; median {r['cpu_median_ratio']:.3f}, "
                  f"ratio of sums {r['cpu_ratio_of_sums']:.3f}", flush=True)
        return
    rows = []
    for layer in (int(x) for x in args.layers.split(",")):
        row = measure(adapter, layer, repeats=args.repeats, batch=args.batch)
        rows.append(row)
        print(f"  layer {layer}: bare {', '.join(f'{t:.2f}' for t in row['bare_all'])}; sweep "
              f"{', '.join(f'{t:.2f}' for t in row['sweep_all'])}; run {', '.join(f'{t:.2f}' for t in row['run_all'])}"
              f" s; {_load_avg()}", flush=True)
    print("\n| layer | bare forward s | sweep s | sweep/bare throughput | end-to-end s | end-to-end/bare |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['bare_s']:.2f} | {r['sweep_s']:.2f} | {r['sweep_ratio']:.3f} | {r['run_s']:.2f} "
              f"| {r['run_ratio']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
