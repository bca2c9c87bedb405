"""Decoding every MLP neuron through the LM head vs a bare chunked matmul of the same shape.

"decode" is `featopt.weights.neurons.decode_model` (all layers, top-10 tokens, probabilities, the
mean of the top-100 for the finder): per chunk of `row_chunk` neurons and `vocab_chunk` tokens one
matmul, a running top-k and a running log-sum-exp. "matmul" is the floor it is compared with: the
same `[neurons, d] x [d, vocab]` products in the same chunks into a reused buffer, nothing else.
Both run in the same process, interleaved, `--repeats` times; medians are reported, of wall time and
of the process's CPU time (which, on a shared machine, does not count the time other processes held
the cores). Peak memory is the largest resident set size (psutil, sampled every 10 ms) above the one
at the start of the call.
Before timing, the decoded top token of a sample of neurons is checked against a full softmax.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_neurons.py [--repeats 2 --models ...]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import psutil
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, load_model
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK
from featopt.weights.neurons import decode_model, neuron_weights

MODELS = ("gpt2-small-shaped", "smollm2-135m-instruct")


def gpt2_small_shaped(seed: int = 0) -> ModelAdapter:
    """GPT2Config() defaults: 12 layers x 3072 neurons = 36,864, d=768, vocab 50,257; random weights."""
    torch.manual_seed(seed)
    return ModelAdapter(GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False), None, name="gpt2-small-shaped")


class PeakRSS:
    """Largest resident set size above the starting one while the `with` block runs (bytes)."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
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
        self.delta = self.peak - self.start


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


def check(adapter: ModelAdapter, row_chunk: int, vocab_chunk: int) -> None:
    """Decoded top tokens of 64 neurons of the last layer equal a full softmax's (else stop)."""
    layer = adapter.n_layers - 1
    got = decode_model(adapter, [layer], k=5, row_chunk=row_chunk, vocab_chunk=vocab_chunk, progress=False)[layer]
    rows = neuron_weights(adapter, layer)[:64]
    with torch.no_grad():
        probs = torch.softmax(rows.double() @ adapter.lm_head.weight.double().T, -1)
    if not torch.equal(got.ids[:64, 0], probs.argmax(-1)):
        raise SystemExit(f"{adapter.name}: decoded top tokens differ from the full softmax")
    torch.testing.assert_close(got.probs[:64, 0].double(), probs.max(-1).values, rtol=1e-4, atol=1e-8)


def bench(adapter: ModelAdapter, args) -> dict:
    layers = list(range(adapter.n_layers if args.layers is None else min(args.layers, adapter.n_layers)))
    neurons = sum(len(neuron_weights(adapter, layer)) for layer in layers)
    V, d = adapter.lm_head.weight.shape
    check(adapter, args.row_chunk, args.vocab_chunk)
    times, cpu = {"matmul": [], "decode": []}, {"matmul": [], "decode": []}
    peaks = {"matmul": 0, "decode": 0}
    for _ in range(args.repeats):
        for mode in ("matmul", "decode"):
            with PeakRSS() as mem:
                start, start_cpu = time.perf_counter(), time.process_time()
                if mode == "matmul":
                    bare_matmul(adapter, layers, args.row_chunk, args.vocab_chunk)
                else:
                    decode_model(adapter, layers, k=10, mean_of=100, row_chunk=args.row_chunk,
                                 vocab_chunk=args.vocab_chunk, progress=False)
                times[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
            peaks[mode] = max(peaks[mode], mem.delta)
    m, dd = statistics.median(times["matmul"]), statistics.median(times["decode"])
    return {"model": adapter.name, "neurons": neurons, "vocab": V, "d": d, "matmul": m, "decode": dd,
            "ratio": dd / m, "cpu_ratio": statistics.median(cpu["decode"]) / statistics.median(cpu["matmul"]),
            "spread": {k: (round(min(v), 2), round(max(v), 2)) for k, v in times.items()},
            "gflops": 2 * neurons * V * d / m / 1e9, "peak_matmul": peaks["matmul"], "peak_decode": peaks["decode"],
            "full": neurons * V * 4}


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
    print("| model | neurons x vocab (d) | bare matmul s | decode s | ratio (wall) | ratio (CPU time) | matmul GFLOP/s | "
          "peak RSS matmul / decode | [N x V] float32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        try:
            adapter = gpt2_small_shaped() if name == "gpt2-small-shaped" else load_model(name)
        except FeatoptError as error:
            print(f"| {name} | skipped: {error} |")
            continue
        r = bench(adapter, args)
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        print(f"| {r['model']} | {r['neurons']:,} x {r['vocab']:,} ({r['d']}) | {r['matmul']:.2f} | {r['decode']:.2f} | "
              f"{r['ratio']:.3f}x | {r['cpu_ratio']:.3f}x | {r['gflops']:.0f} | {mib(r['peak_matmul'])} / {mib(r['peak_decode'])} | "
              f"{r['full'] / 2**30:.1f} GiB |", flush=True)
        print(f"  spread (min, max) s: {r['spread']}", flush=True)


if __name__ == "__main__":
    main()
