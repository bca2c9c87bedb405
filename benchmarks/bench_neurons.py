"""Decoding every MLP neuron through the LM head vs a bare chunked matmul of the same shape.

"decode" is `featopt.weights.neurons.decode_model` (all layers): per chunk of `row_chunk` neurons
and `vocab_chunk` tokens one matmul, a running top-k and a running log-sum-exp, done by the fused
C kernel (`featopt/weights/tile_reduce.c`) or, in the "torch ops" mode, by torch ops as where no
C compiler is found (`FEATOPT_NATIVE=0`). "matmul" is the
floor it is compared with: the same `[neurons, d] x [d, vocab]` products in the same chunks into a
reused buffer, nothing else. Two decode settings are timed: the paper's top-10 tokens with their
probabilities (`--mean_of 10`), and the same plus the neuron finder's normalizer, the mean of the
top-100 probabilities (`--mean_of 100`, the default of `featopt neurons decode`, so that
`neurons find --decoded` can reuse the run); the second keeps a running top-100 instead of a top-10.
All run in the same process, interleaved, `--repeats` times; the ratio of the medians and the ratio
of the fastest runs are reported (on a shared virtual machine the decode's many short parallel
steps suffer more from the other vCPU being taken away than one long matmul does, so the two can
differ). Peak memory is the largest resident set size (psutil, sampled every 10 ms) during a call
above the one with the model loaded, measured in a first, untimed run of each, so that the sampling
thread does not disturb the timings.
Before timing, the decoded top token of a sample of neurons is checked against a full softmax.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_neurons.py [--repeats 2 --models ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from contextlib import contextmanager

import psutil
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, load_model
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK
from featopt.weights.native import kernel
from featopt.weights.neurons import decode_model, neuron_weights

MODELS = ("gpt2-small-shaped", "smollm2-135m-instruct")


def gpt2_small_shaped(seed: int = 0) -> ModelAdapter:
    """GPT2Config() defaults: 12 layers x 3072 neurons = 36,864, d=768, vocab 50,257; random weights."""
    torch.manual_seed(seed)
    return ModelAdapter(GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False), None, name="gpt2-small-shaped")


class PeakRSS:
    """`.peak`: the largest resident set size while the `with` block runs (bytes)."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.no_grad()
def bare_matmul(adapter: ModelAdapter, layers: list[int], row_chunk: int, vocab_chunk: int) -> None:
    W = adapter.lm_head.weight
    V = len(W)
    buffer = torch.empty(row_chunk * min(vocab_chunk, V), dtype=W.dtype)
    for layer in layers:
        rows = neuron_weights(adapter, layer)
        for r0 in range(0, len(rows), row_chunk):
            h = rows[r0:r0 + row_chunk]
            for v0 in range(0, V, vocab_chunk):
                vc = min(vocab_chunk, V - v0)
                torch.mm(h, W[v0:v0 + vc].T, out=buffer[:len(h) * vc].view(len(h), vc))


@contextmanager
def fused_kernel(on: bool):
    """Decode with the fused C kernel or with torch ops only (as where no C compiler is found)."""
    os.environ["FEATOPT_NATIVE"] = "1" if on else "0"
    try:
        if on and kernel() is None:
            raise SystemExit("the fused C kernel did not build here, so only the torch ops could be timed")
        yield
    finally:
        os.environ.pop("FEATOPT_NATIVE")


def check(adapter: ModelAdapter, row_chunk: int, vocab_chunk: int) -> None:
    """Decoded top tokens of 64 neurons of the last layer equal a full softmax's, both paths (else stop)."""
    layer = adapter.n_layers - 1
    rows = neuron_weights(adapter, layer)[:64]
    with torch.no_grad():
        probs = torch.softmax(rows.double() @ adapter.lm_head.weight.double().T, -1)
    for fused in (True, False):
        with fused_kernel(fused):
            got = decode_model(adapter, [layer], k=5, row_chunk=row_chunk, vocab_chunk=vocab_chunk, progress=False)[layer]
        if not torch.equal(got.ids[:64, 0], probs.argmax(-1)):
            raise SystemExit(f"{adapter.name}: decoded top tokens differ from the full softmax (fused kernel: {fused})")
        torch.testing.assert_close(got.probs[:64, 0].double(), probs.max(-1).values, rtol=1e-4, atol=1e-8)


MODES = {  # name: (decode_model settings, fused C kernel on); "matmul" is the bare chunked matmul
    "top-10": ({"k": 10, "mean_of": 10}, True),  # the paper's decoding: top-10 tokens and their probabilities
    "top-10 + finder": ({"k": 10, "mean_of": 100}, True),  # also the finder's normalizer, mean of the top 100
    "top-10 + finder, torch ops": ({"k": 10, "mean_of": 100}, False),  # FEATOPT_NATIVE=0: no C compiler
}


def decode_with(adapter: ModelAdapter, layers: list[int], kw: dict, fused: bool, args) -> None:
    with fused_kernel(fused):
        decode_model(adapter, layers, **kw, row_chunk=args.row_chunk, vocab_chunk=args.vocab_chunk, progress=False)


def bench(adapter: ModelAdapter, args) -> dict:
    layers = list(range(adapter.n_layers if args.layers is None else min(args.layers, adapter.n_layers)))
    neurons = sum(len(neuron_weights(adapter, layer)) for layer in layers)
    V, d = adapter.lm_head.weight.shape
    run = {"matmul": lambda: bare_matmul(adapter, layers, args.row_chunk, args.vocab_chunk)}
    for name, (kw, fused) in MODES.items():
        run[name] = lambda kw=kw, fused=fused: decode_with(adapter, layers, kw, fused, args)
    # Memory first: the largest resident set size during each run, above the one with only the model
    # loaded. Weights loaded from a safetensors file are memory-mapped: read them all once so that
    # paging them in does not count as working memory.
    for p in adapter.model.parameters():
        p.detach().sum()
    base = psutil.Process().memory_info().rss
    peaks = {}
    for mode, fn in run.items():
        with PeakRSS() as mem:
            fn()
        peaks[mode] = mem.peak - base
    check(adapter, args.row_chunk, args.vocab_chunk)
    times = {mode: [] for mode in run}
    for _ in range(args.repeats):
        for mode, fn in run.items():
            start = time.perf_counter()
            fn()
            times[mode].append(time.perf_counter() - start)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    return {"model": adapter.name, "neurons": neurons, "vocab": V, "d": d, "median": med,
            "ratio": {mode: med[mode] / med["matmul"] for mode in MODES},
            "min_ratio": {mode: min(times[mode]) / min(times["matmul"]) for mode in MODES},
            "spread": {k: (round(min(v), 2), round(max(v), 2)) for k, v in times.items()},
            "gflops": 2 * neurons * V * d / med["matmul"] / 1e9, "peaks": peaks, "full": neurons * V * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--row-chunk", type=int, default=ROW_CHUNK)
    parser.add_argument("--vocab-chunk", type=int, default=VOCAB_CHUNK)
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (quick probes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, row_chunk {args.row_chunk}, "
          f"vocab_chunk {args.vocab_chunk}, {args.repeats} repeats")
    print("| model | neurons x vocab (d) | decode | bare matmul s | decode s | ratio of medians | ratio of fastest | "
          "matmul GFLOP/s | peak RSS above the model: matmul / decode | [N x V] float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        try:
            adapter = gpt2_small_shaped() if name == "gpt2-small-shaped" else load_model(name)
        except FeatoptError as error:
            print(f"| {name} | skipped: {error} |")
            continue
        r = bench(adapter, args)
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        for mode in MODES:
            print(f"| {r['model']} | {r['neurons']:,} x {r['vocab']:,} ({r['d']}) | {mode} | {r['median']['matmul']:.2f} | "
                  f"{r['median'][mode]:.2f} | {r['ratio'][mode]:.3f}x | {r['min_ratio'][mode]:.3f}x | {r['gflops']:.0f} | "
                  f"{mib(r['peaks']['matmul'])} / {mib(r['peaks'][mode])} | {r['full'] / 2**30:.1f} GiB |", flush=True)
        print(f"  spread (min, max) s: {r['spread']}", flush=True)


if __name__ == "__main__":
    main()
