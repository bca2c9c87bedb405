"""SAE architectures at several sparsities: FVU against L0 (a part of bench_sae.py, or alone).

Every featopt architecture (topk, batchtopk, matryoshka, jumprelu; relu for reference) is trained
from the same activation cache (`featopt sae cache`, SmolLM2-135M-Instruct `blocks.6.resid_post`,
4x = 2304 latents) on the same `--tokens` in batches of 4096, with each optimizer of `--optimizers`
(default: `sae train`'s default, signum), at several sparsities (k for the topk kinds, the L0
coefficient for jumprelu, the L1 coefficient for relu). `bench_sae.py` runs this as its `archs`
part beside the peers; alone, this script evaluates them with the peers' saved SAEs given with
`--peer NAME=PATH` on the same held-out contexts: FVU, L0, dead fraction, CE loss recovered, KL.
Training from the cache times the SAE step alone (`SAETraining.optimizer_step`): s per 4096 tokens.

Writes `<out>/results.json`, prints a markdown table, and draws `<out>/frontier.png` (FVU against
L0, one line per architecture and optimizer, the peers as points).

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_sae_archs.py \\
        --cache_dir featopt-runs/smollm2-l6-cache --peer sparsify=featopt-runs/bench-sae-defaults/sparsify/layers.6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_runs import BATCH, CONTEXT, SITE, featopt_train, load_for_eval, quiet


def add_flags(p: argparse.ArgumentParser) -> None:
    """The architecture sweep's flags (shared with bench_sae.py)."""
    p.add_argument("--architectures", default="topk,batchtopk,matryoshka,jumprelu")
    p.add_argument("--optimizers", default="signum", help="comma-separated: signum (the default), adam")
    p.add_argument("--ks", default="16,32,64", help="k of the topk kinds")
    p.add_argument("--l0_coefs", default="0.01,0.1,1", help="jumprelu's L0 coefficients")
    p.add_argument("--l1s", default="2,5", help="relu's L1 coefficients")


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


def train_archs(adapter, args, out: Path) -> list[dict]:
    """Train every run of :func:`runs` from `args.cache_dir` into `out/<name>`; one row each."""
    rows, todo = [], runs(args)
    for n, run in enumerate(todo):
        row = featopt_train(adapter, args, out / name_of(run), label=f"featopt {name_of(run)}",
                            activations=args.cache_dir, **run)
        rows.append({**row, "name": name_of(run), **run, "path": row["out"],
                     "sae_step_s_per_4096": row["sae_step_s"] / row["tokens"] * BATCH})
        print(f"[{n + 1}/{len(todo)}] {name_of(run)}: {row['wall_s']:.1f} s, SAE step "
              f"{rows[-1]['sae_step_s_per_4096']:.3f} s / 4096 tokens", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache_dir", required=True, help="activation cache of the training split at " + SITE)
    p.add_argument("--tokens", type=int, default=303_104)
    add_flags(p)
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
    quiet()
    from featopt.data import corpus_contexts
    from featopt.dictionaries.evaluate import evaluate
    from featopt.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model)
    notes: list[str] = []
    rows = train_archs(adapter, args, out)
    for spec in args.peer:
        label, _, path = spec.partition("=")
        rows.append({"name": label, "architecture": label, "peer": True, "path": path})
    held_out = corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="eval")[: args.eval_contexts]
    saes = [load_for_eval(r["path"], adapter, out, notes) for r in rows]
    start = time.perf_counter()
    found = evaluate(adapter, saes, held_out, skip_first=1)
    print(f"evaluated {len(saes)} SAEs on {len(held_out)} held-out contexts in {time.perf_counter() - start:.1f} s", flush=True)
    for row, metrics in zip(rows, found):
        row.update({("eval_tokens" if k == "tokens" else k): v for k, v in metrics.items() if isinstance(v, (int, float))})
    print(table(rows))
    plot(rows, out / "frontier.png", tokens=args.tokens)
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


#: one colour per architecture, shared by featopt's line and the peers' points of that architecture
COLOURS = {"topk": "tab:blue", "batchtopk": "tab:orange", "matryoshka": "tab:green", "jumprelu": "tab:red", "relu": "tab:gray"}


def _architecture_of(row: dict) -> str:
    if not row.get("peer"):
        return row.get("architecture", "")
    return next((a for a in ("batchtopk", "matryoshka", "jumprelu", "topk") if a in row["name"]), "")


def plot(rows: list[dict], path: Path, tokens: int | None = None) -> None:
    """FVU against L0, both log scale: a line per featopt architecture (and optimizer), the peers
    as stars (sparsify: diamonds) in their architecture's colour, featopt's default as a ring."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    lines: dict[tuple[str, str], list] = {}
    for r in rows:
        if not r.get("peer") and "fvu" in r and r.get("architecture") in COLOURS:
            lines.setdefault((r["architecture"], r.get("optimizer", "")), []).append((r["l0"], r["fvu"]))
    for (arch, optimizer), points in sorted(lines.items()):
        points.sort()
        ax.plot(*zip(*points), marker="o", color=COLOURS[arch], linestyle="-" if optimizer != "adam" else ":",
                label=f"featopt {arch} ({optimizer})")
    for r in rows:
        if "fvu" not in r:
            continue
        if r.get("peer"):
            sparsify = r["name"].startswith("sparsify")
            ax.scatter([r["l0"]], [r["fvu"]], marker="D" if sparsify else "*", s=70 if sparsify else 180, zorder=5,
                       color=COLOURS.get(_architecture_of(r), "black"), edgecolors="black", label=r["name"])
        elif r.get("architecture") not in COLOURS:  # featopt's default, a point of its own
            ax.scatter([r["l0"]], [r["fvu"]], marker="o", s=140, facecolors="none", edgecolors="black", zorder=6,
                       label=r["name"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (latents firing per token, held out)")
    ax.set_ylabel("FVU (held out, log scale; lower is better)")
    budget = f"{tokens:,} tokens each" if tokens else "equal tokens"
    ax.set_title(f"SmolLM2-135M blocks.6.resid_post, 2304 latents, {budget}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, plt, path)


if __name__ == "__main__":
    main()
