"""One SAE training step, whole and in parts, against the baselines it replaced, in one run.

Batch 4096 x 576 (SmolLM2's width), 2304 latents, k = 32, random data with per-latent and per-token
offsets (as real pre-activations have), a seeded start, 2 CPU threads unless `--threads`:

- the whole step as `featopt sae train` takes it (loss, backward, the parallel-gradient removal,
  signum's step, the decoder renormalisation) for topk, batchtopk and matryoshka; for topk also with
  the `schedulefree` wrapper's own step (its xor swaps), with a freshly allocated pre-activation
  tensor each step instead of the reused buffer, and with the dense encoder gradient of featopt
  before issue 25 (autograd through `x W_enc`);
- its selection against plain torch: the row top-k through block maxima against `pre.topk`,
  BatchTopK's search against a top-k over all `n * d_sae` entries.

Min and median of `--reps`; every ratio is measured in the same run.

    . .venv/bin/activate && python benchmarks/bench_sae_step.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from schedulefree import ScheduleFreeWrapper

import featopt.models.sae.topk as topk_module
from featopt.dictionaries.optimizers import build, default_lr
from featopt.models.sae import LossTerms, SAEConfig, SparseAutoencoder
from featopt.models.sae.selection import batch_topk_pairs, row_topk_pairs


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


def whole_step(args, arch: str, x: torch.Tensor, total_var: torch.Tensor, *, loss=None, wrapper_step: bool = False,
               fresh_preacts: bool = False):
    """A closure taking one training step of a fresh SAE of `arch` on `x`, as SAETraining does."""
    extra = {"matryoshka": (args.d_sae // 16, args.d_sae // 4, args.d_sae)} if arch == "matryoshka" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=arch, k=args.k, **extra))
    sae.init_weights(torch.Generator().manual_seed(0))
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = build("signum", [{"params": params, "lr": default_lr("signum", args.d_sae)}], total_steps=1000,
                      warmup_steps=0, decay_fraction=0.0)["optimizer"]

    def fresh(n, d_sae, like):
        return torch.empty(n, d_sae, dtype=like.dtype, device=like.device)

    def step():
        optimizer.zero_grad()
        buffer = topk_module.preacts_buffer
        topk_module.preacts_buffer = fresh if fresh_preacts else buffer
        try:
            value = loss(sae, x, total_var) if loss else sae.training_loss(x, total_var, LossTerms())[0]
        finally:
            topk_module.preacts_buffer = buffer
        value.backward()
        sae.remove_parallel_grads()
        ScheduleFreeWrapper.step(optimizer) if wrapper_step else optimizer.step()
        with torch.no_grad():
            sae.normalize_decoder()
        sae.after_step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.d_in, generator=gen) * (0.5 + torch.rand(args.batch, 1, generator=gen))
    total_var = (x - x.mean(0)).pow(2).sum()
    n, d_sae, k = args.batch, args.d_sae, args.k
    pre = torch.randn(n, d_sae, generator=gen) + torch.randn(1, d_sae, generator=gen) + 0.5 * torch.randn(n, 1, generator=gen)

    rows = [  # (name, closure, the name of its baseline or None)
        ("topk step", whole_step(args, "topk", x, total_var), None),
        ("topk step, schedulefree's own step", whole_step(args, "topk", x, total_var, wrapper_step=True), None),
        ("topk step, a fresh pre-activation tensor", whole_step(args, "topk", x, total_var, fresh_preacts=True), None),
        ("topk step, dense encoder gradient (before issue 25)", whole_step(args, "topk", x, total_var, loss=dense_loss), None),
        ("batchtopk step", whole_step(args, "batchtopk", x, total_var), None),
        ("matryoshka step (prefixes 1/16, 1/4, 1)", whole_step(args, "matryoshka", x, total_var), None),
        ("row top-k: pre.topk", lambda: pre.topk(k, dim=-1, sorted=False), None),
        ("row top-k: block maxima (row_topk_pairs)", lambda: row_topk_pairs(pre, k), "row top-k: pre.topk"),
        ("batch top-k: top-k of all entries", lambda: pre.reshape(-1).topk(n * k, sorted=False), None),
        ("batch top-k: block maxima (batch_topk_pairs)", lambda: batch_topk_pairs(pre, k), "batch top-k: top-k of all entries"),
    ]
    results = {name: timed(step, args.reps) for name, step, _ in rows}
    print(f"batch {n} x {args.d_in}, {d_sae} latents, k = {k}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"min / median of {args.reps}")
    for name, _, base in rows:
        low, median = results[name]
        against = f"   {results[base][0] / low:.2f}x the speed of the line above" if base else ""
        print(f"  {name:52s} min {low * 1000:7.1f} ms   median {median * 1000:7.1f} ms{against}")
    step = results["topk step"][0]
    for other in ("topk step, schedulefree's own step", "topk step, a fresh pre-activation tensor",
                  "topk step, dense encoder gradient (before issue 25)"):
        print(f"topk: the step is {results[other][0] / step:.2f}x the speed of the '{other}' one")


if __name__ == "__main__":
    main()
