"""SAE training: featopt's default and every featopt architecture beside sae-lens and sparsify at their defaults.

One setting for all (issue 10's, and issue 25's recipe setting with `--tokens 2000000`):
SmolLM2-135M-Instruct's `blocks.6.resid_post` (the output of decoder layer 6, HF
`hidden_states[7]`), 4x = 2304 latents, contexts of 128 tokens from the shared corpora, `--tokens`
training tokens in batches of 4096, position 0 of every context left out. Parts (`--skip` any):

- `featopt`: `featopt sae train`'s defaults (topk k = 32, signum), trained in this process from
  the model (`--featopt_from cache`: from `--cache_dir`), timed like the peers;
- `sparsify`: eai-sparsify's topk at its defaults (signum), the model cut after layer 6;
- `saelens`: sae-lens' topk as issue 10's table ran it (its architecture defaults; Adam at
  featopt's former rate and schedule), and `saelens_archs`: its batchtopk, matryoshka (prefixes
  1/16, 1/4, 1) and jumprelu (its defaults: L0 coefficient 1, thresholds from 0.01) the same way;
- `archs`: every featopt architecture at several sparsities (`--ks`, `--l0_coefs`, with
  `--optimizers`, bench_sae_archs.py), from the activation cache `--cache_dir`;
- `eval`: every saved SAE read back with featopt's `load_sae` and evaluated by featopt's
  `evaluate` on the same `--eval_contexts` held-out contexts (`split="eval"`): FVU, L0, dead
  fraction, CE loss recovered, KL; and the FVU-against-L0 plot `<out>/frontier.png`;
- `relu`, `cache` (featopt alone): four relu SAEs (1x, 2x, 4x, 8x) from one pass vs one relu 4x,
  same tokens (time ratio; target < 1.5x), and the default SAE trained from an activation cache vs
  from the model (tokens/s ratio; target >= 5x).

The peers run in their own environments (`benchmarks/.peers/<lib>/bin/python
benchmarks/peers/<lib>_train.py`, whose docstrings say exactly how each library is set up), all from
the same token contexts (featopt's `corpus_contexts(split="train")`, written to
`<out>/train_contexts.safetensors` in a seeded random order, tiled where the budget exceeds them)
and the same model folder (featopt's converted GGUF, loaded by the peers with transformers).
Timed per run: wall time of training (model loading excluded; saving included), the model forward
(featopt: `ModelSource.__call__`; sae-lens: `ActivationsStore.get_activations`; sparsify: the base
model's forward minus the time its SAE hook takes) and the SAE step (featopt:
`SAETraining.optimizer_step` minus any forward inside it; the peers: see their runners). Each
peer's row is kept as `<out>/<run>.row.json`; `--resume` reads those back instead of training
again, so one table can gather peer runs made earlier by the same command.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_sae.py \\
        --cache_dir featopt-runs/smollm2-l6-cache [--tokens 303104]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

import bench_sae_archs as archs
from sae_runs import BATCH, CONTEXT, K, SITE, featopt_train, load_for_eval, memoize_contexts, peer_train, quiet

PARTS = ("featopt", "sparsify", "saelens", "saelens_archs", "archs", "relu", "cache", "eval")
#: sae-lens' architectures beside its topk, at its defaults (`peers/saelens_train.py --architecture`)
SAELENS_ARCHS = ("batchtopk", "matryoshka", "jumprelu")


# ----------------------------------------------------------------------------- report
def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """One markdown row per SAE: how it was trained and timed, then the held-out metrics. Speed
    columns are those of runs from the model (a run from the cache has no model forward)."""
    head = ("| SAE | library | trained from | wall s | tokens/s | forward share | SAE step s / 4096 tokens | "
            "SAE step share | FVU | L0 | dead fraction | CE loss recovered | KL (nats) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        step = r["sae_step_s"] / r["tokens"] * BATCH if r.get("tokens") else None
        model = r.get("from", "model") == "model"
        lines.append(
            f"| {r['name']} | {r['library'].split(' ')[0]} {r['version']} | {r.get('from', 'model')} | {_f(r.get('wall_s'), 1)} | "
            f"{_f(r['tokens_per_s'], 0) if model else '-'} | {format(r['forward_s'] / r['wall_s'], '.0%') if model else '-'} | "
            f"{_f(step)} | {format(r['sae_step_s'] / r['wall_s'], '.1%') if model else '-'} | {_f(r.get('fvu'))} | "
            f"{_f(r.get('l0'), 1)} | {_f(r.get('dead_fraction'))} | {_f(r.get('ce_loss_recovered'))} | {_f(r.get('kl_div'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=303_104, help="training tokens per SAE run (74 steps of 4096)")
    p.add_argument("--eval_contexts", type=int, default=64, help="held-out contexts for the evaluation")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--out", default="featopt-runs/bench-sae", help="working folder (its parts are replaced)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the rows of peer runs already in --out (their runner's own output) instead of retraining")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads, here and in the peer runners")
    p.add_argument("--cache_dir", default=None,
                   help="reuse this activation cache of the training split (from `featopt sae cache`) instead of building one")
    p.add_argument("--cache_tokens", type=int, default=None,
                   help="tokens cached for the from-cache run (default: the whole training split, so that the "
                        "cached run trains on exactly the batches the model run did)")
    p.add_argument("--featopt_from", default="model", choices=["model", "cache"],
                   help="train featopt's default SAE from the model (timed like the peers) or from --cache_dir")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsify_optimizer", default="default", choices=["default", "adam", "signum"],
                   help="sparsify's optimizer (default: its own default, signum; adam: the rows measured before 2026-12-06)")
    p.add_argument("--sparsify_whole_model", action="store_true",
                   help="let sparsify run every block (default: the model cut after the SAE's layer, as nothing later reaches it)")
    archs.add_flags(p)
    args = p.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(PARTS):
        raise SystemExit(f"--skip: unknown part(s) {', '.join(sorted(args.skip - set(PARTS)))}; allowed: {', '.join(PARTS)}")
    if args.featopt_from == "cache" and not args.cache_dir:
        raise SystemExit("--featopt_from cache needs --cache_dir (an activation cache from `featopt sae cache`).")
    return args


def build_cache(args, adapter, out: Path) -> tuple[Path, float, int]:
    """`--cache_dir` as it is (not timed), or a new cache of the training split in `out/cache`
    (`--cache_tokens` of it), timed: `(folder, seconds or nan, tokens cached)`."""
    from featopt.commands.sae_cache import CacheConfig, cache
    from featopt.dictionaries.activations import CacheSource

    if args.cache_dir:
        cache_dir = Path(args.cache_dir)
        return cache_dir, float("nan"), math.prod(CacheSource(cache_dir).meta["contexts_shape"])
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    print("[featopt] caching activations", flush=True)
    start = time.perf_counter()
    cached = cache(CacheConfig(model=args.model, site=SITE, corpus=args.corpus, context_length=CONTEXT,
                               max_tokens=args.cache_tokens, out=str(cache_dir), progress=False), adapter=adapter)
    return cache_dir, time.perf_counter() - start, cached.tokens


def main() -> None:
    args = parse()
    skip = args.skip
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    from safetensors.torch import save_file

    from featopt.data import corpus_contexts
    from featopt.models import load_model
    from featopt.models.loading import gguf_cache_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model)
    source = Path(adapter.info.source)
    model_dir = gguf_cache_folder(source) if source.suffix.lower() == ".gguf" else source
    memoize_contexts()
    import featopt.data

    train = featopt.data.corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    contexts_file = out / "train_contexts.safetensors"
    save_file({"input_ids": train[order].contiguous()}, str(contexts_file))
    print(f"model {args.model} ({model_dir}), {SITE}; corpus {args.corpus}: {len(train)} training contexts of {CONTEXT} "
          f"tokens; budget {args.tokens:,} tokens = {-(-args.tokens // BATCH)} steps of {BATCH}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    rows, results, notes = [], {"args": {**vars(args), "skip": sorted(skip)}}, []
    cache_built = None
    if "archs" not in skip and not args.cache_dir:  # the sweep trains from a cache: build it first
        cache_built = build_cache(args, adapter, out)
        args.cache_dir = str(cache_built[0])
    if "featopt" not in skip:
        print(f"[featopt] its defaults (topk k={K}) from the {args.featopt_from}", flush=True)
        row = featopt_train(adapter, args, out / "featopt", activations=args.cache_dir if args.featopt_from == "cache" else None)
        rows.append({**row, "name": f"featopt default (topk k={K}, signum)", "architecture": "featopt default", "optimizer": "signum"})
    if "sparsify" not in skip:
        extra = ["--optimizer", args.sparsify_optimizer] + (["--whole_model"] if args.sparsify_whole_model else [])
        row = peer_train("sparsify", model_dir, contexts_file, args, out / "sparsify", extra)
        rows.append({**row, "name": f"sparsify topk k={K}, its defaults", "peer": True})
    for arch in ("topk",) * ("saelens" not in skip) + SAELENS_ARCHS * ("saelens_archs" not in skip):
        folder = out / ("saelens" if arch == "topk" else f"saelens-{arch}")
        row = peer_train("saelens", model_dir, contexts_file, args, folder, ["--architecture", arch])
        sparsity = "L0 coefficient 1" if arch == "jumprelu" else f"k={K}"
        rows.append({**row, "name": f"sae-lens {arch} {sparsity} (as issue 10's row)", "peer": True})
    if "archs" not in skip:
        rows += [{**r, "name": f"featopt {r['name']}"} for r in archs.train_archs(adapter, args, out / "archs")]
    for r in rows:
        print(f"  {r['name']}: {r['tokens']:,} tokens in {r['wall_s']:.1f} s (forward {r['forward_s']:.1f} s, SAE step "
              f"{r['sae_step_s']:.1f} s, other {r['other_s']:.1f} s)", flush=True)

    if "eval" not in skip and rows:
        from featopt.dictionaries.evaluate import evaluate

        held_out = corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="eval")[: args.eval_contexts]
        saes = [load_for_eval(r["out"], adapter, out, notes) for r in rows]
        print(f"[eval] {len(saes)} SAEs, {len(held_out)} held-out contexts x {CONTEXT} tokens (position 0 left out)", flush=True)
        start = time.perf_counter()
        found = evaluate(adapter, saes, held_out, skip_first=1)
        print(f"  evaluated in {time.perf_counter() - start:.1f} s", flush=True)
        for row, metrics in zip(rows, found):
            row.update({("eval_tokens" if k == "tokens" else k): v for k, v in metrics.items() if isinstance(v, (int, float))})
        archs.plot(rows, out / "frontier.png", tokens=args.tokens)
    results["train"] = rows

    featopt_only = []
    if "relu" not in skip:
        print("[featopt] relu 1x,2x,4x,8x from one pass, then relu 4x alone", flush=True)
        four = featopt_train(adapter, args, out / "relu-1248", architecture="relu", expansion="1,2,4,8")
        one = featopt_train(adapter, args, out / "relu-4", architecture="relu", expansion="4")
        ratio = four["wall_s"] / one["wall_s"]
        results["relu"] = {"four": four, "one": one, "ratio": ratio}
        featopt_only.append(f"| four relu SAEs (1x, 2x, 4x, 8x) from one pass vs one relu 4x, same {four['tokens']:,} tokens | "
                            f"{four['wall_s']:.1f} s vs {one['wall_s']:.1f} s | **{ratio:.2f}x** the time | < 1.5x |")
    if "cache" not in skip:
        cache_dir, cache_s, cached_tokens = cache_built or build_cache(args, adapter, out)
        print("[featopt] topk from the cache", flush=True)
        from_cache = featopt_train(adapter, args, out / "featopt-from-cache", activations=str(cache_dir))
        base = next((r for r in rows if r["name"].startswith("featopt default") and r["from"] == "model"), None)
        if base is None:
            base = featopt_train(adapter, args, out / "featopt")
        ratio = from_cache["tokens_per_s"] / base["tokens_per_s"]
        same = None
        if args.cache_tokens is None:  # the same stream: the two SAEs should be the same
            from featopt.models.sae.formats import load_sae

            a, b = load_sae(base["out"]), load_sae(from_cache["out"])
            same = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        results["cache"] = {"cache_s": cache_s, "cached_tokens": cached_tokens, "from_cache": from_cache, "from_model": base,
                            "ratio": ratio, "max_weight_gap": same}
        featopt_only.append(f"| topk from the cache vs from the model, {from_cache['tokens']:,} tokens | "
                            f"{from_cache['tokens_per_s']:.0f} vs {base['tokens_per_s']:.0f} tokens/s | **{ratio:.1f}x** "
                            f"the speed | >= 5x |")
        notes.append((f"caching {cached_tokens:,} tokens took {cache_s:.1f} s ({cached_tokens / cache_s:.0f} tokens/s), "
                      if cache_s == cache_s else f"the cache of {cached_tokens:,} tokens was reused from {cache_dir}, ")
                     + "not counted in the from-cache run"
                     + (f"; the SAEs trained from the cache and from the model differ by at most {same:.2e} in any weight"
                        if same is not None else "; the cache holds a different number of contexts than the corpus, so "
                        "the cached run saw other batches (speed only)"))

    print()
    if rows:
        print(table(rows))
        print()
    if featopt_only:
        print("| featopt only | measured | ratio | target |\n|---|---|---|---|")
        print("\n".join(featopt_only))
        print()
    for note in notes:
        print(f"note: {note}")
    results["notes"] = notes
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
