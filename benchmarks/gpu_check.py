"""The GPU figures of issue 27, on models built in code with random weights (nothing to download).

Run by `benchmarks/gpu_check.sh` on a machine with one CUDA GPU (under 8 minutes with the tests);
`--smoke` runs every part at toy sizes on the CPU to check the plumbing. Each part prints one JSON
line and a table row; a part that fails prints its error and the others still run.

- **decode**: every MLP neuron of an 8B-shaped Llama (Llama 3 8B: d 4096, 32 layers x 14,336
  neurons, vocabulary 128,256) decoded through the LM head (`decode_model`: top-10 tokens and the
  finder's top-100 mean), against the bare chunked matmul of the same shapes (bench_neurons.py), bf16.
- **sweep**: the exhaustive sweep of every feature of a mid layer against a bare forward of the
  truncated model over the whole vocabulary (sweep_throughput.measure), SmolLM2- and 1B-shaped, bf16.
- **gcg**: seconds per GCG step on a 1B-shaped Llama (Llama 3.2 1B), bf16: (time of 12 steps -
  time of 2 steps) / 10, so loading and set-up cancel.
- **sae_train**: `featopt sae train` tokens/s with the LM (SmolLM2-shaped, bf16) and a 16k-latent
  topk SAE on the GPU.
- **bf16**: the exhaustive sweep's top-1 token per feature in bf16 against float32 (SmolLM2-shaped),
  with the rule of tests/test_bf16_answers.py: a feature is compared when its float32 top-1 beats its
  runner-up by more than twice the largest bf16-vs-float32 difference of top-1 values.

    bash benchmarks/gpu_check.sh                     # on the GPU machine
    python benchmarks/gpu_check.py --smoke --device cpu   # plumbing, anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from featopt.models import ModelAdapter  # noqa: E402
from featopt.models.tiny import tiny_tokenizer  # noqa: E402

SHAPES = {  # Llama shapes of real models; weights random
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
}
# throughput only: the text's content does not matter
TEXT = "The harbour was quiet in the early morning, and the boats rocked against the stone wall. " * 50

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=2048)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_model(shape: str, dtype: torch.dtype, device: str, smoke: bool, seed: int = 0) -> ModelAdapter:
    """A Llama of `shape` with random weights, built directly on `device` in `dtype` (no float32 copy)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**(SMOKE if smoke else SHAPES[shape]), max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_theta=500000.0)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    return ModelAdapter(model.eval().requires_grad_(False), tiny_tokenizer(), name=f"{shape}-random")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def part_decode(args) -> dict:
    from bench_neurons import bare_matmul

    from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK
    from featopt.weights.neurons import decode_model, neuron_weights

    adapter = random_model("llama3-8b", torch.bfloat16, args.device, args.smoke)
    layers = list(range(adapter.n_layers))
    neurons = sum(len(neuron_weights(adapter, layer)) for layer in layers)
    V, d = adapter.lm_head.weight.shape
    run = {"matmul": lambda: bare_matmul(adapter, layers, ROW_CHUNK, VOCAB_CHUNK),
           "decode": lambda: decode_model(adapter, layers, k=10, mean_of=100, progress=False)}
    for fn in run.values():  # warm-up
        fn()
    times = {name: [timed(fn, args.device) for _ in range(2)] for name, fn in run.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"model": adapter.name, "neurons": neurons, "vocab": V, "d": d, "decode_s": med["decode"],
            "matmul_s": med["matmul"], "ratio": med["decode"] / med["matmul"],
            "matmul_tflops": 2 * neurons * V * d / med["matmul"] / 1e12}


def part_sweep(args) -> list[dict]:
    from sweep_throughput import measure

    rows = []
    for shape in ("smollm2-135m", "llama3.2-1b"):
        adapter = random_model(shape, torch.bfloat16, args.device, args.smoke)
        layer = adapter.n_layers // 2
        m = measure(adapter, layer, repeats=2, batch=256 if args.smoke else 4096)
        rows.append({"model": adapter.name, "layer": layer, "vocab": adapter.vocab_size, "bare_s": m["bare_s"],
                     "sweep_s": m["sweep_s"], "run_s": m["run_s"], "sweep_over_bare": m["sweep_s"] / m["bare_s"],
                     "run_over_bare": m["run_s"] / m["bare_s"]})
        del adapter
    return rows


def part_gcg(args) -> dict:
    from featopt.search import gcg

    adapter = random_model("llama3.2-1b", torch.bfloat16, args.device, args.smoke)
    layer = adapter.n_layers // 2
    with tempfile.TemporaryDirectory() as tmp:
        def run(steps: int) -> float:
            return timed(lambda: gcg(adapter=adapter, model=adapter.name, layer=layer, features="[:, :, 0-3]", tokens=8,
                                     steps=steps, device=args.device, dtype="bfloat16", progress=False,
                                     out=os.path.join(tmp, str(steps)), allow="all"), args.device)

        run(1)  # warm-up
        short, long = run(2), run(12)
    return {"model": adapter.name, "layer": layer, "problems": 4, "tokens": 8, "search_width": 512,
            "s_per_step": (long - short) / 10}


def part_sae_train(args) -> dict:
    from featopt.sae import train

    adapter = random_model("smollm2-135m", torch.bfloat16, args.device, args.smoke)
    layer = adapter.n_layers // 2
    tokens = 20_000 if args.smoke else 2_000_000
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write(TEXT * 400)
        settings = dict(model=adapter.name, site=f"blocks.{layer}.resid_post", corpus=corpus, tokens=tokens,
                        batch_size=4096, d_sae=None if args.smoke else 16384, k=32, dtype="bfloat16",
                        accelerator="gpu" if args.device.startswith("cuda") else "cpu", eval_contexts=0,
                        progress=False, out=os.path.join(tmp, "run"))
        wall = timed(lambda: train(adapter=adapter, **settings), args.device)
    return {"model": adapter.name, "site": settings["site"], "d_sae": settings["d_sae"] or 4 * adapter.d_model,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def part_bf16(args) -> dict:
    from featopt.search import exhaustive

    tops = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            adapter = random_model("smollm2-135m", dtype, args.device, args.smoke)
            name = str(dtype).removeprefix("torch.")
            run = exhaustive(adapter=adapter, model=adapter.name, layer=adapter.n_layers // 2,
                             features=f"[:, :, 0-{adapter.d_model - 1}]", top_k=2, dtype=name, device=args.device,
                             progress=False, out=os.path.join(tmp, name))
            top = [r.extra["top_k"] for r in run.results]
            tops[dtype] = (torch.tensor([t["token_ids"] for t in top]), torch.tensor([t["scores"] for t in top]))
    (ids32, v32), (ids16, v16) = tops[torch.float32], tops[torch.bfloat16]
    same = ids32[:, 0] == ids16[:, 0]
    bound = 2 * float((v32[:, 0] - v16[:, 0]).abs().max())
    margin = v32[:, 0] - v32[:, 1]
    decided = margin > bound
    return {"model": "smollm2-135m-random", "features": len(same), "top1_agree": float(same.float().mean()),
            "bound": bound, "decided": int(decided.sum()), "agree_where_decided": float(same[decided].float().mean())
            if bool(decided.any()) else None}


PARTS = {"decode": part_decode, "sweep": part_sweep, "gcg": part_gcg, "sae_train": part_sae_train, "bf16": part_bf16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the plumbing only")
    p.add_argument("--out", default=None, help="folder for gpu_check.json")
    args = p.parse_args()
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": card, "torch": torch.__version__, "smoke": args.smoke, "parts": {}}
    print(f"# GPU check on {card}, torch {torch.__version__}{' (smoke sizes)' if args.smoke else ''}", flush=True)
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            result = PARTS[name](args)
        except Exception as e:  # one part's failure must not hide the others' figures
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        report["parts"][name] = result
        print(json.dumps({"part": name, "seconds": round(time.perf_counter() - start, 1), "result": result}), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            print(f"# peak GPU memory so far: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
