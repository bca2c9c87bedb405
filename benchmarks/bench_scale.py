"""Scale (issue 27): a 1M-latent SAE, bf16 against float32, and SAEs distributed over ranks.

Every measurement runs in a child process of its own (`--child NAME`), so that its peak resident
memory (the kernel's VmHWM, which counts the pages of a memory-mapped file that were touched) and
its time are its own; the parent prints the table and writes `bench_scale.json`.

- **wide**: a synthetic 1M-latent jumprelu SAE at SmolLM2's width (576 x 1,048,576: W_enc and W_dec
  are 4.83 GB of float32, thresholds set so that ~50 latents fire per token), written once as a
  SAELens folder and as a Gemma Scope `params.npz`.
  - load: `load_sae` (memory-mapped) against `safetensors.torch.load_file` of the same file, and,
    for the npz, featopt's first load (converted once to a cached safetensors file) and its second
    against a plain `np.load` of every array;
  - sweep: `featopt search exhaustive --sae` over every latent (1,048,576 problems, one pass) of the
    first `--tokens` token ids, against a bare forward of the model truncated after the SAE's layer +
    a dense `sae.encode` of the same batches (the target: <= 1.3x), with the peak memory against
    the weights + the model + 1.5 GB.
- **bf16**: the neuron decode (`neurons decode`, first `--decode_layers` layers) and the exhaustive
  sweep (every feature of a mid layer's resid_post) in bfloat16 against float32, on SmolLM2-135M and on
  a Gemma-3-270M-shaped model built in code with random weights (vocabulary 262,144, width 640):
  time, peak memory, and how many answers agree (the rule of tests/test_bf16_answers.py).
- **distributed**: `sae train` of 4 SAEs (4 sites) with `--distribute_modules` on 2 CPU ranks against
  1 process: wall time and the largest weight difference.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_scale.py [--parts wide,bf16,distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct-q4_1-gguf"
D_IN, D_SAE, LAYER = 576, 1 << 20, 15


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(name: str, *args: str) -> dict:
    """Run `--child name args` in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--child", name, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"child {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ children
def make_wide(folder: str) -> dict:
    """The synthetic SAE, in SAELens' format and as params.npz: random unit decoder rows, the encoder
    their transpose, one threshold making ~50 of 1M latents fire per token of SmolLM2's layer 15."""
    import numpy as np
    import torch

    from featopt.models import load_model
    from featopt.models.sae import SAEConfig, SparseAutoencoder
    from featopt.models.sae.formats import save_sae

    out = Path(folder)
    adapter = load_model(MODEL)
    with torch.inference_mode():  # the site's statistics over a sample of single tokens
        site = adapter.site("resid_post", LAYER)
        h = adapter.run([site], input_ids=torch.arange(0, adapter.vocab_size, 97)[:, None])[site][:, 0].float()
    mean = h.mean(0)
    del adapter
    gen = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu", hook_name=f"blocks.{LAYER}.hook_resid_post",
                    apply_b_dec_to_input=False)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
        # SmolLM2's residual stream is dominated by one mean direction (norm ~24,000 of ~24,000): the
        # encoder reads the centred activation (b_enc = -mean W_enc), and one threshold is set at the
        # quantile that makes 50 of the 1M latents fire on the median token (a few outlier tokens fire many more).
        sae.b_enc.copy_(-(mean @ sae.W_enc))
        pre = (h - mean) @ sae.W_enc[:, :65536]
        sae.threshold.fill_(float(torch.quantile(pre, 1 - 50 / D_SAE, dim=1).median()))
    save_sae(sae, out / "saelens")
    arrays = {k: getattr(sae, k).detach().numpy() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    (out / "gemma-scope").mkdir(exist_ok=True)
    np.savez(out / "gemma-scope" / "params.npz", **arrays)
    return {"bytes": sum(a.nbytes for a in arrays.values())}


def load_child(how: str, path: str) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from featopt.models.sae import SAEConfig, SparseAutoencoder
    from featopt.models.sae.formats import load_sae

    start = time.perf_counter()  # after the imports: only the load is timed
    if how == "featopt":
        sae = load_sae(path, hook_name=f"blocks.{LAYER}.hook_resid_post")
        touched = float(sae.W_enc.sum() + sae.W_dec.sum())  # read every page: a lazy map is not a load
    elif how == "copying":  # featopt before issue 27: read the file whole, a zero SAE, then copy into it
        cfg = json.loads((Path(path) / "cfg.json").read_text())
        sae = SparseAutoencoder(SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], architecture="jumprelu",
                                          apply_b_dec_to_input=False))
        sae.load_state_dict(load_file(str(Path(path) / "sae_weights.safetensors")))
        touched = float(sae.W_enc.sum() + sae.W_dec.sum())
    elif how == "safetensors":
        tensors = load_file(path)
        touched = float(sum(t.sum() for t in tensors.values()))
    else:  # np.load of the npz, every array
        with np.load(path) as data:
            tensors = {k: torch.from_numpy(data[k]) for k in data.files}
        touched = float(sum(t.sum() for t in tensors.values()))
    return {"seconds": time.perf_counter() - start, "peak": peak_rss(), "checksum": touched}


def sweep_child(how: str, folder: str, tokens: int, batch: int) -> dict:
    import torch

    from featopt.models import load_model
    from featopt.models.sae.formats import load_sae

    adapter = load_model(MODEL)
    sae = load_sae(folder)
    base = peak_rss()  # the SAE is mapped, not read: this is Python, torch and the model
    start = time.perf_counter()
    if how == "featopt":  # the library's sweep: the problems, their scorers, one pass, the top-1 of each
        from featopt.discrete.exhaustive import exhaustive
        from featopt.objectives import latent

        objective = latent(sae, f"[:, :, 0-{D_SAE - 1}]")
        topk = exhaustive(adapter, objective, candidates=torch.arange(tokens), k=1, batch_size=batch, progress=False)
        best_v, best_i = topk.values[0].float(), topk.ids[0]
    else:  # bare forward (the model truncated after the layer) + dense encode, the same batches
        sys.path.insert(0, str(HERE))
        from sweep_throughput import truncated

        model = truncated(adapter, LAYER)
        # the site is the block's output, before the final norm (which HF's last_hidden_state applies)
        model._modules[next(n for n, m in model._modules.items() if m is adapter.final_norm)] = torch.nn.Identity()
        best_v = torch.full((D_SAE,), -float("inf"))
        best_i = torch.zeros(D_SAE, dtype=torch.long)
        with torch.inference_mode():
            for lo in range(0, tokens, batch):
                ids = torch.arange(lo, min(lo + batch, tokens))
                z = sae.encode(model(input_ids=ids[:, None], use_cache=False).last_hidden_state[:, 0])
                v, i = z.max(0)
                better = v > best_v
                best_v[better], best_i[better] = v[better], i[better] + lo
    seconds = time.perf_counter() - start
    fired = best_v > 0  # a latent that never fires has no best token (ties of zeros are arbitrary)
    return {"seconds": seconds, "peak": peak_rss(), "model_peak": base, "fired": int(fired.sum()),
            "best": torch.where(fired, best_i, -1)[:200_000].tolist()}


def precision_child(model: str, dtype: str, decode_layers: int, layer: int, candidates: int) -> dict:
    """The neuron decode of the first `decode_layers` layers and the sweep of every feature of
    `blocks.{layer}.resid_post` over the first `candidates` token ids (0: all), in `dtype`."""
    import torch

    from featopt.discrete.exhaustive import exhaustive
    from featopt.models import load_model
    from featopt.objectives import maximize
    from featopt.weights.neurons import decode_model

    torch_dtype = getattr(torch, dtype)
    adapter = gemma_shaped(torch_dtype) if model == "gemma3-270m-shaped" else load_model(model, dtype=torch_dtype)
    base = peak_rss()
    start = time.perf_counter()
    decoded = decode_model(adapter, list(range(decode_layers)), k=1, mean_of=1, progress=False)
    decode_s = time.perf_counter() - start
    ids = torch.arange(candidates or adapter.vocab_size)
    start = time.perf_counter()
    topk = exhaustive(adapter, maximize(f"[:, :, 0-{adapter.d_model - 1}]", f"blocks.{layer}.resid_post"),
                      candidates=ids, k=2, progress=False)
    sweep_s = time.perf_counter() - start
    return {"decode_s": decode_s, "sweep_s": sweep_s, "peak": peak_rss(), "model_peak": base,
            "decode_top1": torch.cat([d.ids[:, 0] for d in decoded.values()]).tolist(),
            "sweep_ids": topk.ids.tolist(), "sweep_values": topk.values.float().tolist()}


def gemma_shaped(dtype):
    """Gemma 3 270M's shape with random weights: 18 layers, width 640, vocabulary 262,144."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from featopt.models import ModelAdapter

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Gemma3ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return ModelAdapter(model.eval().requires_grad_(False), None, name="gemma3-270m-shaped")


CHILDREN = {"make_wide": make_wide, "load": load_child, "sweep": sweep_child, "precision": precision_child}


# ------------------------------------------------------------------------------------ parts
def wide_files(args) -> Path:
    """The synthetic SAE's folder, made once."""
    folder = Path(args.out) / "sae-1m"
    if not (folder / "saelens" / "cfg.json").exists() or not (folder / "gemma-scope" / "params.npz").exists():
        child("make_wide", str(folder))
    return folder


def warm(file: Path) -> None:
    """Read `file` once, so that every load below reads it from the page cache (what a second load
    of the same SAE sees), not from disk: the first timed load would otherwise pay for all."""
    with open(file, "rb") as f:
        while f.read(64 << 20):
            pass


def part_load(args) -> dict:
    folder = wide_files(args)
    st, npz = folder / "saelens" / "sae_weights.safetensors", folder / "gemma-scope" / "params.npz"
    cases = {"featopt (memory map)": ("featopt", folder / "saelens", st),
             "featopt before issue 27 (read, zero SAE, copy)": ("copying", folder / "saelens", st),
             "safetensors load_file": ("safetensors", st, st),
             "featopt npz, first (converts once)": ("featopt", npz, npz),
             "featopt npz, cached": ("featopt", npz, None),
             "np.load npz": ("numpy", npz, npz)}
    out = {"weights_bytes": 2 * D_IN * D_SAE * 4}
    for name, (how, path, file) in cases.items():
        if file is not None:
            warm(file)
        out[name] = child("load", how, str(path))
    return out


def part_sweep(args) -> dict:
    folder = wide_files(args)
    weights = 2 * D_IN * D_SAE * 4
    sweeps = {how: child("sweep", how, str(folder / "saelens"), str(args.tokens), str(args.batch))
              for how in ("bare", "featopt")}
    a, b = sweeps["bare"].pop("best"), sweeps["featopt"].pop("best")
    fired = [i for i, t in enumerate(a) if t >= 0]
    model = sweeps["featopt"]["model_peak"]  # the process with the model loaded (the SAE mapped, not yet read)
    return {"weights_bytes": weights, "tokens": args.tokens, "batch": args.batch, "sweeps": sweeps,
            "ratio": sweeps["featopt"]["seconds"] / sweeps["bare"]["seconds"],
            "target_peak": weights + model + int(1.5 * 2**30),
            "checked_latents": len(fired), "same_best_token": sum(a[i] == b[i] for i in fired)}


def agreement(a: dict, b: dict) -> dict:
    """How many answers of run `b` (bf16) equal run `a`'s (float32): decoded top-1 tokens, and the
    sweep's top-1 per feature, all and where the float32 margin (top-1 minus runner-up) exceeds twice
    the largest bf16-vs-float32 difference of the top-1 values where the two agree on the token."""
    dec = sum(x == y for x, y in zip(a["decode_top1"], b["decode_top1"]))
    ia, ib = a["sweep_ids"][0], b["sweep_ids"][0]
    va, vb = a["sweep_values"], b["sweep_values"]
    same = [x == y for x, y in zip(ia, ib)]
    delta = max((abs(va[0][j] - vb[0][j]) for j in range(len(ia)) if same[j]), default=0.0)
    decided = [j for j in range(len(ia)) if va[0][j] - va[1][j] > 2 * delta]
    return {"decode_same": f"{dec}/{len(a['decode_top1'])}", "sweep_same": f"{sum(same)}/{len(same)}",
            "delta": delta, "sweep_same_where_decided": f"{sum(same[j] for j in decided)}/{len(decided)}"}


def part_bf16(args) -> dict:
    out = {}
    for model, layer, candidates in ((MODEL, 2, 0), ("gemma3-270m-shaped", 2, args.gemma_tokens)):
        runs = {dtype: child("precision", model, dtype, str(args.decode_layers), str(layer), str(candidates))
                for dtype in ("float32", "bfloat16")}
        out[model] = {"agreement": agreement(runs["float32"], runs["bfloat16"]), "layer": layer,
                      "candidates": candidates or "all", "decode_layers": args.decode_layers,
                      **{dtype: {k: r[k] for k in ("decode_s", "sweep_s", "peak", "model_peak")} for dtype, r in runs.items()}}
    return out


def part_distributed(args) -> dict:
    """`sae train` of 4 SAEs (layers 2-5) in one process and with --distribute_modules on 2 CPU ranks."""
    import torch

    from featopt.models.sae.formats import load_sae

    corpus = Path(os.environ.get("FEATOPT_MODEL_PATH", "../shared/models")).parent / "data" / "corpora" / "shakespeare"
    base = [sys.executable, "-m", "featopt", "sae", "train", "--model", MODEL, "--corpus", str(corpus),
            "--site", "blocks.2-5.resid_post", "--expansion", "4", "--k", "32", "--context_length", "128",
            "--batch_size", "1024", "--buffer_batches", "4", "--tokens", str(args.train_tokens), "--eval_contexts", "0",
            "--accelerator", "cpu", "--no_progress"]
    out, runs = Path(args.out) / "distributed", {}
    for name, extra in (("1 process", []), ("2 ranks, --distribute_modules", ["--devices", "2", "--distribute_modules"])):
        folder = out / name.split(",")[0].replace(" ", "-")
        start = time.perf_counter()
        subprocess.run(base + ["--out", str(folder), *extra], check=True, capture_output=True)
        runs[name] = {"seconds": time.perf_counter() - start, "folder": folder}
    one, two = (r["folder"] for r in runs.values())
    diffs = []
    for sub in sorted(p.name for p in one.iterdir() if (p / "cfg.json").exists()):
        a, b = load_sae(one / sub).state_dict(), load_sae(two / sub).state_dict()
        diffs.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    return {"tokens": args.train_tokens, "saes": len(diffs), "max_abs_diff": max(diffs),
            **{name: round(r["seconds"], 1) for name, r in runs.items()}, "torch_threads": torch.get_num_threads()}


PARTS = {"load": part_load, "sweep": part_sweep, "bf16": part_bf16, "distributed": part_distributed}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--out", default="featopt-runs/bench-scale")
    p.add_argument("--tokens", type=int, default=4096, help="candidate token ids (the first ones) of the wide sweep")
    p.add_argument("--batch", type=int, default=256, help="rows per batch, both sides of the wide sweep")
    p.add_argument("--train_tokens", type=int, default=65536, help="tokens of the distributed sae train")
    p.add_argument("--decode_layers", type=int, default=2, help="layers of the bf16/float32 neuron decode")
    p.add_argument("--gemma_tokens", type=int, default=32768, help="candidate token ids of the Gemma-shaped sweep")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, *rest = args.child
        fn = CHILDREN[name]
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(fn(*rest)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {}
    for name in args.parts.split(","):
        report[name] = PARTS[name](args)
        print(json.dumps({name: report[name]}, default=str)[:4000], flush=True)
    (Path(args.out) / "bench_scale.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
