"""SAE architectures at several sparsities, against the peers' saved SAEs: FVU against L0.

Every featopt architecture (topk, batchtopk, matryoshka, jumprelu; relu for reference) is trained
from the same activation cache (`featopt sae cache`, SmolLM2-135M-Instruct `blocks.6.resid_post`,
4x = 2304 latents) on the same `--tokens` in batches of 4096, with each optimizer of `--optimizers`,
at several sparsities (k for the topk kinds, the L0 coefficient for jumprelu, the L1 coefficient
for relu). Then every SAE, and the peers' SAEs given with `--peer NAME=PATH` (saved by
bench_sae.py: sparsify at its defaults, sae-lens), is evaluated by featopt's `evaluate` on the same
held-out contexts: FVU, L0, dead fraction, CE loss recovered, KL. Training from the cache times
the SAE step alone (`SAETraining.optimizer_step`, as bench_sae.py does): seconds per 4096 tokens.

Writes `<out>/results.json`, prints a markdown table, and draws `<out>/frontier.png` (FVU against
L0, one line per architecture and optimizer, the peers as points).

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_sae_archs.py \\
        --cache_dir featopt-runs/smollm2-l6-cache --peer sparsify=featopt-runs/bench-sae-defaults/sparsify/layers.6
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SITE, CONTEXT, BATCH = "blocks.6.resid_post", 128, 4096


def _bench_sae():
    spec = importlib.util.spec_from_file_location("bench_sae", ROOT / "benchmarks" / "bench_sae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(args) -> list[dict]:
    """One training per (architecture, sparsity, optimizer)."""
    out = []
    for optimizer in args.optimizers.split(","):
        for arch in args.architectures.split(","):
            if arch == "jumprelu":
                out += [dict(architecture=arch, l0_coef=float(c), optimizer=optimizer) for c in args.l0_coefs.split(",")]
            elif arch == "relu":
                out += [dict(architecture=arch, l1=float(c), optimizer=optimizer) for c in args.l1s.split(",")]
            else:
                out += [dict(architecture=arch, k=int(k), optimizer=optimizer) for k in args.ks.split(",")]
    return out


def name_of(run: dict) -> str:
    sparsity = next(f"{key}{run[key]:g}" for key in ("k", "l0_coef", "l1") if key in run)
    return f"{run['architecture']}-{sparsity}-{run['optimizer']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache_dir", required=True, help="activation cache of the training split at " + SITE)
    p.add_argument("--tokens", type=int, default=303_104)
    p.add_argument("--architectures", default="topk,batchtopk,matryoshka,jumprelu")
    p.add_argument("--optimizers", default="adam,signum")
    p.add_argument("--ks", default="16,32,64")
    p.add_argument("--l0_coefs", default="0.5,1,2")
    p.add_argument("--l1s", default="2,5")
    p.add_argument("--peer", action="append", default=[], help="NAME=PATH of a peer's saved SAE at the same site")
    p.add_argument("--eval_contexts", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--out", default="featopt-runs/bench-sae-archs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot_only", nargs="+", help="redraw the table and plot from these results.json files (rows merged)")
    args = p.parse_args()
    if args.plot_only:
        rows = [row for path in args.plot_only for row in json.loads(Path(path).read_text())["rows"]]
        print(table(rows))
        plot(rows, Path(args.out) / "frontier.png")
        return
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; quiet them after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from featopt.commands.sae_train import TrainConfig, train
    from featopt.data import corpus_contexts
    from featopt.dictionaries.evaluate import evaluate
    from featopt.models import load_model

    bench = _bench_sae()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model)
    rows, notes = [], []
    todo = runs(args)
    for n, run in enumerate(todo):
        folder = out / name_of(run)
        shutil.rmtree(folder, ignore_errors=True)
        config = TrainConfig(model=args.model, site=SITE, activations=args.cache_dir, tokens=args.tokens, batch_size=BATCH,
                             context_length=CONTEXT, eval_contexts=0, seed=args.seed, progress=False, out=str(folder), **run)
        with bench.FeatoptTimers() as t:
            start = time.perf_counter()
            trained = train(config, adapter=adapter)
            wall = time.perf_counter() - start
        tokens = -(-args.tokens // BATCH) * BATCH
        rows.append({"name": name_of(run), **run, "path": str(trained.paths[0]), "wall_s": wall,
                     "sae_step_s_per_4096": t.step_s / tokens * BATCH})
        print(f"[{n + 1}/{len(todo)}] {name_of(run)}: {wall:.1f} s, SAE step {rows[-1]['sae_step_s_per_4096']:.3f} s / 4096 "
              "tokens", flush=True)
    for spec in args.peer:
        label, _, path = spec.partition("=")
        rows.append({"name": label, "architecture": label, "peer": True, "path": path})

    held_out = corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="eval")[: args.eval_contexts]
    saes = [bench.load_for_eval(r["path"], adapter, out, notes) for r in rows]
    start = time.perf_counter()
    found = evaluate(adapter, saes, held_out, skip_first=1)
    print(f"evaluated {len(saes)} SAEs on {len(held_out)} held-out contexts in {time.perf_counter() - start:.1f} s", flush=True)
    for row, metrics in zip(rows, found):
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    print(table(rows))
    plot(rows, out / "frontier.png")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "notes": notes,
                                                  "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    for note in notes:
        print("note:", note)
    print(f"results: {out / 'results.json'}, {out / 'frontier.png'}")


def table(rows: list[dict]) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| SAE | FVU | L0 | dead fraction | CE loss recovered | KL (nats) | SAE step s / 4096 tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("peer", False), r["architecture"], r.get("optimizer", ""), r.get("l0", 0))):
        lines.append(f"| {r['name']} | {f(r.get('fvu'))} | {f(r.get('l0'), 1)} | {f(r.get('dead_fraction'))} | "
                     f"{f(r.get('ce_loss_recovered'))} | {f(r.get('kl_div'))} | {f(r.get('sae_step_s_per_4096'))} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lines: dict[str, list] = {}
    for r in rows:
        if not r.get("peer") and "fvu" in r:
            lines.setdefault(f"{r['architecture']} ({r['optimizer']})", []).append((r["l0"], r["fvu"]))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot(*zip(*points), marker="o", label=f"featopt {label}")
    for r in rows:
        if r.get("peer") and "fvu" in r:
            ax.scatter([r["l0"]], [r["fvu"]], marker="*", s=160, zorder=5, label=f"{r['name']} (saved SAE)")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (latents firing per token, held out)")
    ax.set_ylabel("FVU (held out; lower is better)")
    ax.set_title("SmolLM2-135M blocks.6.resid_post, 2304 latents, 303k tokens each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, plt, path)


if __name__ == "__main__":
    main()
