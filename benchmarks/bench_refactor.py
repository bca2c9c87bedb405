"""Issue 23's refactor against the code before it, in one run: the same workloads on SmolLM2-135M
from two source trees, each measurement a fresh process, the trees alternated (A B A B ...) so that
a drift of this VM's speed falls on both.

- **sweep**: `featopt search exhaustive` for all 576 features of a layer's output over the whole
  vocabulary (the model loaded beforehand and passed in), seconds from the call to results.json;
- **gcg**: `featopt search gcg` for 8 features of layer 8, 8 tokens, 6 steps of 256 candidates per
  feature (pooled), seconds per step (the first step, the gradient and scoring set-up, included);
- **sae**: `featopt sae train` of a topk SAE (4x, k = 32) at blocks.6.resid_post from the model over
  the corpus, 65,536 tokens (16 steps of 4096), no evaluation: tokens per second;
- **decode**: `featopt neurons decode` of every MLP neuron of every layer, top 10: seconds.

Each tree is called through its own API (before: `featopt.search.exhaustive.run`, ...; after:
`featopt.commands.search.exhaustive`, ...). The sweep's speed against a bare forward (paired batch by
batch) is `sweep_throughput.py --paired`, run from each tree. Prints medians and after/before ratios.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_refactor.py --before ../before --after . --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("sweep", "gcg", "sae", "decode")
MODEL = "smollm2-135m-instruct"


def _imports():
    """The run functions and configs of the tree on sys.path: after the refactor, or before it."""
    try:
        from featopt.commands.neurons import DecodeConfig, decode
        from featopt.commands.sae_train import TrainConfig, train
        from featopt.commands.search import ExhaustiveConfig, exhaustive
        from featopt.commands.swaps import GCGConfig, gcg
    except ImportError:  # noqa: F401 - the tree before the refactor: its names, bound for locals()
        from featopt.sae.commands import TrainConfig  # noqa: F401
        from featopt.sae.commands import run_train as train
        from featopt.search.exhaustive import ExhaustiveConfig
        from featopt.search.exhaustive import run as exhaustive
        from featopt.search.gcg import GCGConfig
        from featopt.search.gcg import run as gcg
        from featopt.weights.neurons import DecodeConfig
        from featopt.weights.neurons import run_decode as decode
    return locals()


def worker(workload: str, out: str, corpus: str) -> dict:
    """One measurement in this process: `{"seconds": ..., "value": ..., "unit": ...}`."""
    import torch

    from featopt.models import load_model

    torch.set_num_threads(2)
    api = _imports()
    adapter = load_model(MODEL)
    if workload == "sweep":
        config = api["ExhaustiveConfig"](model=MODEL, layer=0, features="[:, :, 0-575]", progress=False, out=out)
        t0 = time.perf_counter()
        api["exhaustive"](config, adapter)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "value": seconds, "unit": "s"}
    if workload == "gcg":
        steps = 6
        config = api["GCGConfig"](model=MODEL, layer=8, features="[:, :, 0-7]", tokens=8, steps=steps, search_width=256,
                                  progress=False, out=out)
        t0 = time.perf_counter()
        api["gcg"](config, adapter)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "value": seconds / steps, "unit": "s/step"}
    if workload == "sae":
        tokens = 65_536
        config = api["TrainConfig"](model=MODEL, site="blocks.6.resid_post", corpus=corpus, architecture="topk",
                                    expansion="4", k=32, tokens=tokens, batch_size=4096, eval_contexts=0, progress=False,
                                    out=out)
        t0 = time.perf_counter()
        api["train"](config, adapter)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "value": tokens / seconds, "unit": "tok/s"}
    config = api["DecodeConfig"](model=MODEL, top_k=10, progress=False, out=out)
    t0 = time.perf_counter()
    api["decode"](config, adapter)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "value": seconds, "unit": "s"}


def _run(tree: Path, workload: str, out: Path, corpus: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", workload, "--out", str(out), "--corpus", corpus],
                          env=env, capture_output=True, text=True, cwd=str(tree))
    if proc.returncode:
        raise RuntimeError(f"{tree} {workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _paired(tree: Path, repeats: int) -> list[float]:
    """Each tree's own sweep_throughput.py --paired: the sweep/bare ratios it prints (bare / sweep)."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.run([sys.executable, "benchmarks/sweep_throughput.py", "--layers", "0", "--threads", "2",
                           "--paired", str(repeats)], env=env, capture_output=True, text=True, cwd=str(tree))
    if proc.returncode:
        raise RuntimeError(f"{tree} sweep_throughput failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-6:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="the source tree before the refactor")
    p.add_argument("--after", type=Path, default=Path("."), help="the source tree after it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--corpus", default=str(Path("../shared/data/corpora").resolve()))
    p.add_argument("--paired", type=int, default=4, help="sweep_throughput --paired sweeps per tree (0: skip)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, args.corpus)))
        return
    import tempfile

    trees = {"before": args.before, "after": args.after}
    figures = {w: {name: [] for name in trees} for w in args.workloads.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for workload in figures:
                order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate who goes first
                for name in order:
                    found = _run(trees[name], workload, Path(tmp) / f"{workload}-{name}-{r}", args.corpus)
                    figures[workload][name].append(found)
                    print(f"repeat {r} {workload:7s} {name:6s} {found['value']:.4g} {found['unit']}", flush=True)
    report = {}
    for workload, by in figures.items():
        med = {name: statistics.median(f["value"] for f in runs) for name, runs in by.items()}
        unit = by["after"][0]["unit"]
        # the two runs of one repeat ran back to back: their ratio is the steadiest figure
        pairs = [a["value"] / b["value"] for a, b in zip(by["after"], by["before"])]
        report[workload] = {"unit": unit, **med, "after/before": med["after"] / med["before"],
                            "pair_ratios": pairs, "all": {name: [f["value"] for f in runs] for name, runs in by.items()}}
        print(f"{workload:7s} before {med['before']:.4g} {unit}, after {med['after']:.4g} {unit}: after/before "
              f"{med['after'] / med['before']:.3f} (medians), {statistics.median(pairs):.3f} (median of the "
              f"repeats' pairs: {', '.join(f'{r:.3f}' for r in pairs)})")
    if args.paired:
        for name, tree in trees.items():
            report[f"paired-{name}"] = _paired(tree, args.paired)
            print(f"sweep_throughput --paired ({name}):\n  " + "\n  ".join(report[f"paired-{name}"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
