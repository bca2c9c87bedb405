"""Corpus statistics of every SAE latent in one pass vs a bare pass over the same tokens.

The bare pass is what any statistic needs at least: the model to the SAE's site (early exit) and
the SAE's encode, nothing kept. The statistics pass is `featopt.dictionaries.corpus_stats.corpus_stats`:
the same forward and encode, plus, for all latents at once, running top-k examples with their
context windows, frequency, max, sum, the equal-width histogram and one uniform example per bin.
Both read the same contexts in the same batches; the bare pass runs first and again last (the
mean of the two is the baseline, so drift of the machine shows as their difference). Target: the
statistics pass at most 1.2x the bare pass.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_features.py \\
        --sae featopt-runs/sae-smollm2-l6-topk [--tokens 1000000] [--out featopt-runs/bench-features]

The SAE is the SAE issue's recipe (`recipes/sae-smollm2-l6-topk.yaml`). The statistics are saved
in `--out` so that `featopt sae dashboard --stats` can reuse them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def bare_pass(adapter, sae, site, contexts, batch_contexts: int) -> float:
    start = time.perf_counter()
    total = 0.0
    with torch.inference_mode():
        for b in range(0, len(contexts), batch_contexts):
            acts = adapter.run([site], input_ids=contexts[b:b + batch_contexts])[site]
            total += float(sae.encode(acts).sum())  # keep the encode from being skipped
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sae", default="featopt-runs/sae-smollm2-l6-topk")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--context_length", type=int, default=128)
    p.add_argument("--batch_contexts", type=int, default=8)
    p.add_argument("--out", default="featopt-runs/bench-features")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    from featopt.data import corpus_contexts
    from featopt.models import load_model
    from featopt.results import versions
    from featopt.models.sae.attach import attach
    from featopt.dictionaries.corpus_stats import corpus_stats
    from featopt.models.sae.formats import load_sae

    adapter = load_model(args.model)
    sae = load_sae(args.sae)
    _, site = attach(adapter, sae, args.sae)
    contexts, sources = corpus_contexts(adapter.tokenizer, args.corpus, args.context_length, split="all",
                                        max_tokens=args.tokens, with_sources=True)
    n = contexts.numel()
    print(f"{args.model}, SAE {args.sae} ({sae.cfg.architecture}, d_sae {sae.d_sae}) at {site}; {n:,} tokens "
          f"({len(contexts)} contexts of {args.context_length}; the corpus holds no more than this)"
          if n < args.tokens else f"{n:,} tokens", flush=True)
    bare_pass(adapter, sae, site, contexts[: 2 * args.batch_contexts], args.batch_contexts)  # warm-up
    first = bare_pass(adapter, sae, site, contexts, args.batch_contexts)
    print(f"bare pass: {first:.1f} s ({n / first:.0f} tok/s)", flush=True)
    start = time.perf_counter()
    stats = corpus_stats(adapter, sae, contexts, sources=sources, batch_contexts=args.batch_contexts, progress=False)
    full = time.perf_counter() - start
    print(f"statistics pass: {full:.1f} s ({n / full:.0f} tok/s)", flush=True)
    last = bare_pass(adapter, sae, site, contexts, args.batch_contexts)
    bare = (first + last) / 2
    print(f"bare pass again: {last:.1f} s; statistics / bare = {full / bare:.3f}x (target <= 1.2x)", flush=True)
    stats.meta.update({"model": adapter.name, "sae": sae.describe(), "config": {
        "corpus": args.corpus, "split": "all", "eval_fraction": 0.05, "tokens": args.tokens,
        "context_length": args.context_length}, "versions": versions()})
    stats.save(args.out)
    summary = {"tokens": n, "bare_s": [first, last], "stats_s": full, "ratio": full / bare, "versions": versions(),
               "threads": torch.get_num_threads()}
    (__import__("pathlib").Path(args.out) / "bench.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
