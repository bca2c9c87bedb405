"""One SAE training step, the sparse step against the dense encoder gradient it replaced.

Batch 4096 x 576 (SmolLM2's width), 2304 latents, k = 32, random data and a seeded start: the
topk training loss of featopt before issue 25 (autograd through the dense `x W_enc`, the decoder
by `embedding_bag`) against `TopKSAE.training_loss` (the sparse step: the encoder's gradient over
the kept pairs only), and BatchTopK's, forward + backward, min and median of `--reps`. Prints the
ratio measured in the same run.

    . .venv/bin/activate && python benchmarks/bench_sae_step.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from featopt.models.sae import LossTerms, SAEConfig, SparseAutoencoder


def dense_loss(sae, x, total_var):
    """featopt's topk training loss before the sparse step (commit 40c8763), without AuxK."""
    pre = sae.training_pre_acts(x)
    top = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    values, indices = torch.relu(top.values), top.indices
    x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
    return (x - x_hat).pow(2).sum() / total_var


def timed(step, reps: int) -> tuple[float, float]:
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(1))
    total_var = (x - x.mean(0)).pow(2).sum()
    results = {}
    for arch in ("topk", "batchtopk"):
        sae = SparseAutoencoder(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=arch, k=args.k))
        sae.init_weights(torch.Generator().manual_seed(0))

        def sparse(sae=sae):
            sae.zero_grad()
            sae.training_loss(x, total_var, LossTerms())[0].backward()

        results[f"{arch}, sparse step"] = timed(sparse, args.reps)
        if arch == "topk":
            def dense(sae=sae):
                sae.zero_grad()
                dense_loss(sae, x, total_var).backward()

            results["topk, dense encoder gradient (before)"] = timed(dense, args.reps)
    print(f"batch {args.batch} x {args.d_in}, {args.d_sae} latents, k = {args.k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, (low, median) in results.items():
        print(f"  {name:40s} min {low * 1000:7.1f} ms   median {median * 1000:7.1f} ms")
    ratio = results["topk, dense encoder gradient (before)"][0] / results["topk, sparse step"][0]
    print(f"topk: the sparse step is {ratio:.2f}x the speed of the dense step (min over {args.reps})")


if __name__ == "__main__":
    main()
