"""SAE training: featopt vs sae-lens vs sparsify on the same SAE, tokens and model; then featopt alone.

One topk SAE (4x = 2304 latents, k = 32) on SmolLM2-135M-Instruct's `blocks.6.resid_post` (the
output of decoder layer 6, HF `hidden_states[7]`), contexts of 128 tokens from the shared corpora,
`--tokens` training tokens in batches of 4096, position 0 of every context left out, Adam at
featopt's default learning rate with each library's nearest schedule. featopt trains in this
process (`featopt.commands.sae_train.train`); sae-lens and sparsify each in their own environment
(`benchmarks/.peers/<lib>/bin/python benchmarks/peers/<lib>_train.py`, whose docstrings say
exactly how each library is set up), all from the same token contexts (featopt's
`corpus_contexts(split="train")`, written to `<out>/train_contexts.safetensors` in a seeded random
order; each library then draws and shuffles as it does) and the same model folder (featopt's
converted GGUF, loaded by the peers with transformers).

Timed per library: wall time of training (model loading excluded; saving included), the model
forward (featopt: `ModelSource.__call__`; sae-lens: `ActivationsStore.get_activations`; sparsify:
the base model's forward minus the time its SAE hook takes) and the SAE step (featopt:
`SAETraining.optimizer_step` minus any forward inside it, i.e. SAE forward + backward + Adam; the
peers: see their runners). Then every saved SAE is read back with featopt's `load_sae` and
evaluated by featopt's `evaluate` on the same held-out contexts (`split="eval"`): FVU, L0, dead
fraction, CE loss recovered.

featopt alone: four relu SAEs (1x, 2x, 4x, 8x) from one pass vs one relu 4x SAE, same tokens
(time ratio; target < 1.5x), and the topk SAE trained from an activation cache (`sae_cache.cache` first,
timed apart) vs from the model (tokens/s ratio; target >= 5x).

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_sae.py [--tokens 303104]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from featopt.errors import FeatoptError

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"saelens": ("sae-lens", "saelens_train.py"), "sparsify": ("sparsify", "sparsify_train.py")}
PARTS = ("featopt", "saelens", "sparsify", "relu", "cache", "eval")
LAYER, CONTEXT, BATCH, K, EXPANSION = 6, 128, 4096, 32, 4
SITE = f"blocks.{LAYER}.resid_post"


# ----------------------------------------------------------------------------- timing featopt
class FeatoptTimers:
    """Wraps `ModelSource.__call__` (the model forward of the stream) and
    `SAETraining.optimizer_step` (closure = training step + backward, then Adam and the decoder
    renormalisation) for the duration of a `with` block."""

    def __enter__(self):
        from featopt.dictionaries.activations import ModelSource
        from featopt.dictionaries.train import SAETraining

        self.forward_s = self.step_s = 0.0
        self.forward_contexts = 0
        self._saved = (ModelSource.__call__, SAETraining.optimizer_step)
        source_call, optimizer_step = self._saved
        timers = self

        @functools.wraps(source_call)
        def timed_source(source, index):
            start = time.perf_counter()
            try:
                return source_call(source, index)
            finally:
                timers.forward_s += time.perf_counter() - start
                timers.forward_contexts += len(index)

        @functools.wraps(optimizer_step)
        def timed_step(module, *args, **kwargs):
            start, forward_before = time.perf_counter(), timers.forward_s
            try:
                return optimizer_step(module, *args, **kwargs)
            finally:  # a buffer refill inside the step is forward time, not SAE time
                timers.step_s += (time.perf_counter() - start) - (timers.forward_s - forward_before)

        ModelSource.__call__, SAETraining.optimizer_step = timed_source, timed_step
        return self

    def __exit__(self, *exc):
        from featopt.dictionaries.activations import ModelSource
        from featopt.dictionaries.train import SAETraining

        ModelSource.__call__, SAETraining.optimizer_step = self._saved


def memoize_contexts() -> None:
    """Tokenize the corpus once per process: `train` and `cache` (`featopt.commands.sae_train`) look
    `corpus_contexts` up in `featopt.data` when called, so this keeps tokenizing out of every timed
    run (the peers get their contexts ready-made too)."""
    import inspect

    import featopt.data

    original = featopt.data.corpus_contexts
    signature = inspect.signature(original)
    memo: dict = {}

    @functools.wraps(original)
    def cached(tokenizer, path, context_length, **kwargs):
        bound = signature.bind(tokenizer, path, context_length, **kwargs)
        bound.apply_defaults()
        key = (id(tokenizer), str(path), context_length, tuple(sorted(bound.kwargs.items())))
        if key not in memo:
            memo[key] = original(tokenizer, path, context_length, **kwargs)
        return memo[key]

    featopt.data.corpus_contexts = cached


def featopt_train(adapter, args, out: Path, *, architecture: str = "topk", expansion: str = str(EXPANSION),
                  activations: str | None = None) -> dict:
    from featopt.commands.sae_train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(model=args.model, site=SITE, corpus=None if activations else args.corpus, activations=activations,
                         architecture=architecture, expansion=expansion, k=K, tokens=args.tokens, batch_size=BATCH,
                         context_length=CONTEXT, eval_contexts=0, seed=args.seed, progress=False, out=str(out))
    with FeatoptTimers() as t:
        start = time.perf_counter()
        run = train(config, adapter=adapter)
        wall = time.perf_counter() - start
    tokens = json.loads((run.out / "training.json").read_text())["run"]["tokens"]
    import featopt

    return {"library": "featopt", "version": getattr(featopt, "__version__", "dev"), "tokens": tokens,
            "steps": -(-args.tokens // BATCH), "wall_s": wall, "tokens_per_s": tokens / wall, "forward_s": t.forward_s,
            "sae_step_s": t.step_s, "other_s": wall - t.forward_s - t.step_s, "forward_tokens": t.forward_contexts * CONTEXT,
            "threads": torch.get_num_threads(), "out": str(run.paths[0] if len(run.paths) == 1 else run.out),
            "paths": [str(p) for p in run.paths]}


# ----------------------------------------------------------------------------- peers
def peer_train(name: str, model_dir: Path, contexts: Path, args, out: Path) -> dict:
    env_name, script = PEERS[name]
    python = ROOT / "benchmarks" / ".peers" / env_name / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: make the peer environments first (benchmarks/README.md, 'Peer environments').")
    cmd = [str(python), str(ROOT / "benchmarks" / "peers" / script), "--model_dir", str(model_dir), "--contexts", str(contexts),
           "--tokens", str(args.tokens), "--out", str(out), "--layer", str(LAYER), "--expansion", str(EXPANSION),
           "--k", str(K), "--batch_size", str(BATCH), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if name == "sparsify":
        cmd += ["--optimizer", args.sparsify_optimizer] + (["--whole_model"] if args.sparsify_whole_model else [])
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = out.parent / f"{name}.log"
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}); log: {log}\n{tail}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- evaluation
def load_for_eval(path: str, adapter, out: Path, notes: list[str]):
    """featopt's `load_sae`; where it refuses a peer's file or its hook name, say so and work around."""
    from featopt.models.sae.formats import load_sae, site_of

    try:
        sae = load_sae(path)
    except FeatoptError as error:
        if "rescale_acts_by_decoder_norm" not in str(error):
            raise
        # sae-lens folds the decoder norms into the saved weights (unit-norm rows) but keeps the flag
        # in cfg.json; with unit rows the flag changes nothing, so read a copy with it cleared.
        from safetensors.torch import load_file

        norms = load_file(str(Path(path) / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
        gap = float((norms - 1).abs().max())
        if gap > 1e-4:
            raise
        copy = out / f"{Path(path).name}-flag-cleared"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        cfg = json.loads((copy / "cfg.json").read_text())
        cfg["rescale_acts_by_decoder_norm"] = False
        (copy / "cfg.json").write_text(json.dumps(cfg))
        sae = load_sae(copy)
        notes.append(f"load_sae({path}) refused it ({error}); its decoder rows are unit norm (max |norm - 1| = "
                     f"{gap:.1e}), so the flag is a no-op: evaluated a copy with it cleared ({copy}).")
    try:
        adapter.site(sae.cfg.hook_name)
    except FeatoptError:
        site = site_of(sae.cfg.hook_name)
        notes.append(f"{path}: hook name {sae.cfg.hook_name!r} is not a site `evaluate` accepts; "
                     f"renamed to {site!r} with featopt.models.sae.formats.site_of.")
        sae.cfg.hook_name = site
    return sae


# ----------------------------------------------------------------------------- report
def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict], metrics: dict) -> str:
    peers = [r["tokens_per_s"] for r in rows if r["library"] != "featopt"]
    fastest = max(peers) if peers else None
    head = ("| library | version | tokens trained | model tokens run | wall s | tokens/s | ratio to the faster peer | "
            "forward share | SAE step s / 4096 tokens | FVU | L0 | dead fraction | CE loss recovered |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        m = metrics.get(r["library"], {})
        ratio = f"{r['tokens_per_s'] / fastest:.2f}x" if fastest else "-"
        lines.append(
            f"| {r['library']} | {r['version']} | {r['tokens']:,} | {r['forward_tokens']:,} | {r['wall_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {ratio} | {r['forward_s'] / r['wall_s']:.0%} | "
            f"{r['sae_step_s'] / r['tokens'] * BATCH:.3f} | {_f(m.get('fvu'))} | {_f(m.get('l0'), 1)} | "
            f"{_f(m.get('dead_fraction'))} | {_f(m.get('ce_loss_recovered'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=303_104, help="training tokens per SAE run (74 steps of 4096)")
    p.add_argument("--eval_contexts", type=int, default=64, help="held-out contexts for the evaluation")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--out", default="featopt-runs/bench-sae", help="working folder (its parts are replaced)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads, here and in the peer runners")
    p.add_argument("--cache_dir", default=None,
                   help="reuse this activation cache of the training split (from `featopt sae cache`) instead of building one")
    p.add_argument("--cache_tokens", type=int, default=None,
                   help="tokens cached for the from-cache run (default: the whole training split, so that the "
                        "cached run trains on exactly the batches the model run did)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsify_optimizer", default="default", choices=["default", "adam", "signum"],
                   help="sparsify's optimizer (default: its own default, signum; adam: the rows measured before 2026-12-06)")
    p.add_argument("--sparsify_whole_model", action="store_true",
                   help="let sparsify run every block (default: the model cut after the SAE's layer, as nothing later reaches it)")
    args = p.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        raise SystemExit(f"--skip: unknown part(s) {', '.join(sorted(skip - set(PARTS)))}; allowed: {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; quiet them after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

    rows, results, notes = [], {"args": vars(args)}, []
    if "featopt" not in skip:
        print("[featopt] topk from the model", flush=True)
        rows.append(featopt_train(adapter, args, out / "featopt"))
    for name in ("saelens", "sparsify"):
        if name not in skip:
            rows.append(peer_train(name, model_dir, contexts_file, args, out / name))
    for r in rows:
        print(f"  {r['library']}: {r['tokens']:,} tokens in {r['wall_s']:.1f} s ({r['tokens_per_s']:.0f} tok/s; forward "
              f"{r['forward_s']:.1f} s, SAE step {r['sae_step_s']:.1f} s, other {r['other_s']:.1f} s)", flush=True)
    results["train"] = rows

    metrics: dict = {}
    if "eval" not in skip and rows:
        from featopt.dictionaries.evaluate import evaluate

        held_out = corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="eval")[: args.eval_contexts]
        saes = [load_for_eval(r["out"], adapter, out, notes) for r in rows]
        print(f"[eval] {len(held_out)} held-out contexts x {CONTEXT} tokens (position 0 left out)", flush=True)
        start = time.perf_counter()
        found = evaluate(adapter, saes, held_out, skip_first=1)
        print(f"  evaluated in {time.perf_counter() - start:.1f} s", flush=True)
        metrics = {r["library"]: m for r, m in zip(rows, found)}
        results["eval"] = metrics

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
        from featopt.commands.sae_cache import CacheConfig, cache

        if args.cache_dir:  # an existing cache of the same split (`featopt sae cache`): not rebuilt, not timed
            from featopt.dictionaries.activations import CacheSource

            cache_dir, cache_s = Path(args.cache_dir), float("nan")
            cached = argparse.Namespace(tokens=math.prod(CacheSource(cache_dir).meta["contexts_shape"]))
        else:
            cache_dir = out / "cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            print("[featopt] caching activations", flush=True)
            start = time.perf_counter()
            cached = cache(CacheConfig(model=args.model, site=SITE, corpus=args.corpus, context_length=CONTEXT,
                                           max_tokens=args.cache_tokens, out=str(cache_dir), progress=False), adapter=adapter)
            cache_s = time.perf_counter() - start
        print("[featopt] topk from the cache", flush=True)
        from_cache = featopt_train(adapter, args, out / "featopt-from-cache", activations=str(cache_dir))
        base = next((r for r in rows if r["library"] == "featopt"), None)
        if base is None:
            base = featopt_train(adapter, args, out / "featopt")
        ratio = from_cache["tokens_per_s"] / base["tokens_per_s"]
        same = None
        if args.cache_tokens is None:  # the same stream: the two SAEs should be the same
            from featopt.models.sae.formats import load_sae

            a, b = load_sae(base["out"]), load_sae(from_cache["out"])
            same = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        results["cache"] = {"cache_s": cache_s, "cached_tokens": cached.tokens, "from_cache": from_cache, "from_model": base,
                            "ratio": ratio, "max_weight_gap": same}
        featopt_only.append(f"| topk from the cache vs from the model, {from_cache['tokens']:,} tokens | "
                            f"{from_cache['tokens_per_s']:.0f} vs {base['tokens_per_s']:.0f} tokens/s | **{ratio:.1f}x** "
                            f"the speed | >= 5x |")
        notes.append((f"caching {cached.tokens:,} tokens took {cache_s:.1f} s ({cached.tokens / cache_s:.0f} tokens/s), "
                      if not args.cache_dir else f"the cache of {cached.tokens:,} tokens was reused from {args.cache_dir}, ")
                     + "not counted in the from-cache run"
                     + (f"; the SAEs trained from the cache and from the model differ by at most {same:.2e} in any weight"
                        if same is not None else "; the cache holds a different number of contexts than the corpus, so "
                        "the cached run saw other batches (speed only)"))

    print()
    if rows:
        print(table(rows, metrics))
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
