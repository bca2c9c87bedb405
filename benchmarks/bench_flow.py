"""All-feature matching of two SAEs by decoder cosine vs a dense float32 matmul of the same shapes.

Document 003 matches every feature of one SAE against every decoder row of another. featopt's
`featopt.feature_flow.match.top_matches` normalizes the rows and goes through the target rows `chunk` at a
time, keeping only each row's top-k, so at most a `[chunk, d_sae]` block exists. The baseline is
the bare product `A @ B.T` of the same shapes in float32 (no normalization, no top-k), which holds
the whole `[d_sae, d_sae]` matrix. Target: at most 1.2x the baseline's time, memory bounded by
the chunk. Each variant runs in its own child process so its peak memory (max RSS above the RSS
with the inputs already built) is its own.

    . .venv/bin/activate && python benchmarks/bench_flow.py [--d_sae 16384] [--d_in 576] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(kind: str, d_sae: int, d_in: int, k: int, chunk: int, repeats: int) -> dict:
    from featopt.feature_flow.match import top_matches

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(d_sae, d_in, generator=g), torch.randn(d_sae, d_in, generator=g)
    if kind == "dense":
        run = lambda: A @ B.T  # noqa: E731
    else:
        run = lambda: top_matches(A, B, k, chunk=chunk)  # noqa: E731
    run()  # warm up (threads, allocator)
    base = _rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "k": k, "chunk": chunk, "seconds": min(times), "all_seconds": times,
            "peak_above_inputs_mb": max(peak, peak0) - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_sae", type=int, default=16384)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.d_sae, args.d_in, args.k, args.chunk, args.repeats)))
        return
    rows = []
    for kind, k in (("dense", 1), ("match", 1), ("match", 5), ("dense", 1)):  # dense first and last: drift shows
        cmd = [sys.executable, __file__, "--child", kind, "--k", str(k), "--d_sae", str(args.d_sae), "--d_in",
               str(args.d_in), "--repeats", str(args.repeats), "--chunk", str(args.chunk)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    dense = sum(r["seconds"] for r in rows if r["kind"] == "dense") / 2
    dense_mem = max(r["peak_above_inputs_mb"] for r in rows if r["kind"] == "dense")
    print(f"two SAEs of {args.d_sae} latents, width {args.d_in}; {torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'variant':<28} {'seconds':>8} {'x dense':>8} {'peak MB':>8}")
    for r in rows:
        name = "dense A @ B.T (float32)" if r["kind"] == "dense" else f"top_matches k={r['k']} chunk={r['chunk']}"
        print(f"{name:<28} {r['seconds']:>8.2f} {r['seconds'] / dense:>8.2f} {r['peak_above_inputs_mb']:>8.0f}")
    print(f"block bound: chunk x d_sae x 4 bytes = {args.chunk * args.d_sae * 4 / 2**20:.0f} MB; "
          f"dense matrix {args.d_sae ** 2 * 4 / 2**20:.0f} MB (measured {dense_mem:.0f} MB)")


if __name__ == "__main__":
    main()
