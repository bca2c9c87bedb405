"""Inputs that fire SAE latents, against the corpus: `featopt sae inputs` (pooled EPO, warm-started
from corpus windows) beside the dashboard's former methods and per-latent search.

On latents chosen by seed among those that fire in the corpus, each method's best input is
re-measured on the latent (a plain forward plus the SAE) and divided by the latent's corpus
maximum; an input is *fluent* when the model's cross-entropy of it is at most the median over the
latent's top corpus windows of the same length (8 tokens). Methods, each in its own process (its
wall time and peak memory measured from outside):

- `exhaustive`: every vocabulary token as the one-token input after the end-of-text prefix (the
  dashboard's single tokens), one sweep for all latents;
- `simplex`: the dashboard's former gradient-ascent input (4 tokens, softmax-simplex prior, 100
  steps on the pre-activation, all latents in one batched run), decoded and re-measured;
- `pooled`: `featopt sae inputs` at the settings below, every candidate scored for every latent;
- `per-latent`: the same search with `--no_pool` (each latent's members score their own candidates
  only): the same number of scored sequences per latent;
- `per-latent-5x`: per-latent search with 5x the steps on the first `--subset` latents (against
  pooled on the same latents: does pooling reach equal ratios with 5x fewer forwards per latent?).

The searches record their history (after each step: the sequences each latent's members brought
and its best and best fluent score), drawn as `curves.png` (latents at the corpus max against
sequences scored per latent) and read for the last table: the sequences per latent the pooled
search needed to reach what per-latent search had reached at each of its steps.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_sae_inputs.py \\
        --sae featopt-runs/sae-smollm2-l6-topk --stats featopt-runs/l6-features [--latents 100] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch


def _median(values):
    values = sorted(values)
    return values[(len(values) - 1) // 2] if values else None


def _latents(stats_dir: str, n: int, seed: int) -> list[int]:
    from featopt.dictionaries.feature_stats import FeatureStats

    stats = FeatureStats.load(stats_dir)
    firing = (stats.max > 0).nonzero()[:, 0]
    picks = torch.randperm(len(firing), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(int(firing[i]) for i in picks)


def _yardstick(adapter, sae, stats_dir: str, latents: list[int], n_tokens: int, prefix):
    """Corpus max and fluency threshold per latent (the same computation `sae inputs` records)."""
    from featopt.dictionaries import corpus_windows
    from featopt.dictionaries.feature_stats import FeatureStats
    from featopt.objectives import latent

    stats = FeatureStats.load(stats_dir)
    windows = corpus_windows.from_stats(stats, latents, n_tokens, bos=adapter.bos)
    measure = latent(sae, f"[:, :, [{', '.join(map(str, latents))}]]", over="last").bind(adapter)
    fluent = corpus_windows.fluency(adapter, measure, windows, prefix)
    return windows.maximum.tolist(), fluent.threshold.tolist(), measure


def _score_inputs(adapter, measure, ids, maximum, threshold, prefix_len):
    """Re-measure inputs `ids [P, T]` (row p for latent p) and return per-latent rows."""
    from featopt.discrete.candidates import prompt_xent
    from featopt.discrete.measure import remeasure

    measured = remeasure(adapter, measure, ids).activation
    xent = prompt_xent(adapter, ids, prefix_len)
    return [{"activation": float(a), "xent": float(x), "ratio": float(a) / m, "fluent": float(x) <= t,
             "text": adapter.decode(ids[p, prefix_len:].tolist())}
            for p, (a, x, m, t) in enumerate(zip(measured, xent, maximum, threshold))]


def one(args) -> dict:
    """Run one method in this process; its per-latent rows and cost."""
    from featopt.commands.sae_inputs import default_prefix
    from featopt.models import load_model
    from featopt.models.sae.formats import load_sae

    latents = json.loads(args.latent_list)
    adapter, sae = load_model(args.model), load_sae(args.sae)
    prefix_text = default_prefix(adapter, None)
    prefix = adapter.encode(prefix_text)
    maximum, threshold, measure = _yardstick(adapter, sae, args.stats, latents, args.tokens, prefix)
    listed = ", ".join(map(str, latents))
    start = time.perf_counter()
    forwards = None
    if args.one == "exhaustive":
        from featopt.search import exhaustive

        run = exhaustive(model=args.model, sae=args.sae, features=f"[:, {len(prefix)}, [{listed}]]", prefix=prefix_text,
                         top_k=1, out=f"{args.out}/exhaustive", progress=False, objective="maximize")
        ids = torch.tensor([r.token_ids for r in run.results])
        forwards = adapter.vocab_size / len(latents)  # one sweep: every token scored for every latent at once
    elif args.one == "simplex":
        from featopt.commands.optimize import AscentConfig, optimize
        from featopt.models.sae.attach import attach

        _, site = attach(adapter, sae)
        pre = adapter.with_features(site, sae.pre_activation_map())
        run = optimize(AscentConfig(model=args.model, layer=site.layer, site=site.kind, features=f"[:, 3, [{listed}]]",
                                    tokens=4, steps=100, prior="simplex", lr=0.1, objective="maximize", seed=args.seed,
                                    out=f"{args.out}/simplex", progress=False, decode_every=100), adapter=pre)
        # As the dashboard ran it: no prefix, the first token at position 0; re-measured the same way.
        ids = torch.tensor([r.token_ids for r in run.results])
        forwards = 100  # gradient steps per latent (one batched forward and backward each)
        rows = _score_inputs(adapter, measure, ids, maximum, threshold, 0)
        for r in rows:
            r.update({"fluent_ratio": r["ratio"] if r["fluent"] else 0.0, "forwards": forwards})
        return {"method": args.one, "latents": latents, "rows": rows, "seconds": time.perf_counter() - start,
                "forwards_total": forwards * len(latents), "maximum": maximum, "threshold": threshold}
    else:
        from featopt.sae import inputs

        steps = args.steps * (5 if args.one == "per-latent-5x" else 1)
        run = inputs(model=args.model, sae=args.sae, stats=args.stats, features=f"[:, :, [{listed}]]",
                     tokens=args.tokens, steps=steps, search_width=args.search_width, topk=args.topk,
                     lambdas=args.lambdas, budget=args.budget, likely=args.likely, warm=args.warm, sweep=args.sweep,
                     pool=args.one == "pooled", seed=args.seed,
                     out=f"{args.out}/{args.one}", progress=False)
        rows = []
        for r, m, t in zip(run.records, maximum, threshold):
            fluent = r["best_fluent"]
            rows.append({"activation": r["best"]["activation"], "xent": r["best"]["xent"], "ratio": r["best_ratio"],
                         "fluent_activation": fluent["activation"] if fluent else None,
                         "fluent_ratio": r["best_fluent_ratio"] or 0.0, "fluent_xent": fluent["xent"] if fluent else None,
                         "text": r["best"]["text"], "fluent_text": fluent["text"] if fluent else None,
                         "forwards": r["forward_evaluations"]})
        return {"method": args.one, "latents": latents, "rows": rows, "seconds": time.perf_counter() - start,
                "forwards_total": sum(r["forward_evaluations"] for r in run.records), "maximum": maximum,
                "threshold": threshold}
    rows = _score_inputs(adapter, measure, ids, maximum, threshold, len(prefix))
    for r in rows:
        r.update({"fluent_ratio": r["ratio"] if r["fluent"] else 0.0, "forwards": forwards})
    return {"method": args.one, "latents": latents, "rows": rows, "seconds": time.perf_counter() - start,
            "forwards_total": forwards * len(latents), "maximum": maximum, "threshold": threshold}


def rows_from_results(folder: Path) -> list[dict]:
    """A `sae inputs` run's rows from its results.json, every corpus window counted as an input (as
    `records` does since the windows joined the front: runs written before that are scored alike)."""
    from featopt.dictionaries.inputs import SLACK

    rows = []
    for r in json.loads((folder / "results.json").read_text())["results"]:
        e = r["extra"]
        top, thr = e["corpus_max"], e["fluency_threshold"]
        best = max([e["best"]["activation"]] + e["corpus_window_alone"])
        fluent = [e["best_fluent"]["activation"]] if e["best_fluent"] else []
        fluent += [a for a, x in zip(e["corpus_window_alone"], e["corpus_window_xent"]) if thr is not None and x <= thr + SLACK]
        xent = e["best_fluent"]["xent"] if e["best_fluent"] else None
        rows.append({"activation": best, "ratio": best / top, "fluent_activation": max(fluent) if fluent else None,
                     "fluent_ratio": max(fluent) / top if fluent else 0.0, "fluent_xent": xent,
                     "forwards": e["forward_evaluations"]})
    return rows


def histories(folder: Path) -> list[dict] | None:
    """A `sae inputs` run's per-latent records (their `extra`), read once; None when the run is
    missing or was written before records kept histories."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    extras = [r["extra"] for r in json.loads(path.read_text())["results"]]
    return extras if all(e.get("history") for e in extras) else None


def curve(extras: list[dict], pick: list[int] | None = None) -> list[tuple[float, int, int]]:
    """A run's progress from its records' histories (see `histories`): after each step, the mean
    sequences scored per latent so far and how many latents' best (and best fluent) searched
    score had reached the corpus max (its windows as inputs counted from the start), over the
    latents `pick` (indices; default all)."""
    extras = [extras[i] for i in pick] if pick is not None else extras
    steps = min(len(e["history"]["forwards"]) for e in extras)
    out = []
    for s in range(steps):
        mean = sum(e["history"]["forwards"][s] for e in extras) / len(extras)
        reach = lambda key: sum((e["history"][key][s] or -1e9) >= e["corpus_max"] for e in extras)  # noqa: E731
        out.append((mean, reach("best"), reach("best_fluent")))
    return out


def forwards_to_match(pooled: list[tuple[float, int, int]], target: tuple[float, int, int]) -> float | None:
    """The pooled search's scored inputs per latent when it first had at least the best and fluent
    counts of `target` (None: not within its run)."""
    return next((f for f, b, fl in pooled if b >= target[1] and fl >= target[2]), None)


def plot_curves(groups: dict[str, dict[str, list[tuple[float, int, int]]]], path: Path) -> None:
    """Latents at or above the corpus max against sequences scored per latent: one row of panels
    per group of latents (best, best fluent), one line per run."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for row, (group, series) in zip(axes, groups.items()):
        for name, points in series.items():
            x = [f for f, _, _ in points]
            row[0].plot(x, [b for _, b, _ in points], "o-", ms=2.5, label=name)
            row[1].plot(x, [fl for _, _, fl in points], "o-", ms=2.5, label=name)
        for ax, what in zip(row, ("best input", "best fluent input")):
            ax.set_xlabel("sequences scored per latent")
            ax.set_ylabel(f"latents, {what}\n>= corpus max")
            ax.set_title(f"{group}: {what}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle("Progress of the searches: latents whose input reaches the corpus max", fontsize=9)
    fig.tight_layout()
    save_figure(fig, plt, path)


def _run_child(args, method: str, latents: list[int]) -> dict:
    out = Path(args.out) / f"{method}.json"
    cmd = [sys.executable, __file__, "--one", method, "--latent_list", json.dumps(latents)] + [
        a for a in sys.argv[1:]]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{method} failed (status {status})")
    found = json.loads(child.stdout.read())
    found["wall"] = time.perf_counter() - start
    found["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    out.write_text(json.dumps(found, indent=1))
    return found


def _table_row(name: str, rows: list[dict], found: dict) -> str:
    n = len(rows)
    best = sum(r["ratio"] >= 1 for r in rows)
    fluent = sum(r["fluent_ratio"] >= 1 for r in rows)
    fx = [r["fluent_xent"] if "fluent_xent" in r else (r["xent"] if r.get("fluent") else None) for r in rows]
    fx = [x for x in fx if x is not None]
    per = found["forwards_total"] / len(found["latents"]) if found.get("forwards_total") else None
    return (f"| {name} | {best}/{n} | {_median([r['ratio'] for r in rows]):.3f} | {fluent}/{n} | "
            f"{_median([r['fluent_ratio'] for r in rows]):.3f} | {(_median(fx) if fx else float('nan')):.2f} | "
            f"{per if per is None else f'{per:,.0f}'} | {found['wall']:.0f} s | {found['peak_rss_gib']:.1f} GiB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sae", default="featopt-runs/sae-smollm2-l6-topk")
    p.add_argument("--stats", default="featopt-runs/l6-features")
    p.add_argument("--latents", type=int, default=100)
    p.add_argument("--subset", type=int, default=20)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--search_width", type=int, default=16)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--lambdas", type=float, nargs="*", default=[0.0])
    p.add_argument("--budget", type=float, nargs="*", default=[4.0])
    p.add_argument("--likely", type=int, default=256, help="sae inputs --likely (budget members' likely-token swaps)")
    p.add_argument("--warm", type=int, default=8)
    p.add_argument("--sweep", type=int, default=0, help="sae inputs --sweep (the table's comparison rows: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="exhaustive,simplex,pooled,per-latent,per-latent-5x",
                   help="methods to run now (empty: only rebuild the table from the folder)")
    p.add_argument("--out", default="featopt-runs/bench-sae-inputs")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--latent_list", help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(one(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    latents = _latents(args.stats, args.latents, args.seed)
    subset = latents[: args.subset]
    print(f"{len(latents)} latents (seed {args.seed}); subset for 5x: {subset}", flush=True)
    found = {}
    for method in filter(None, args.methods.split(",")):
        found[method] = _run_child(args, method, subset if method == "per-latent-5x" else latents)
        print(f"{method}: {found[method]['wall']:.0f} s", flush=True)
    # Rows of an earlier run in the same folder (same latents) that this one did not repeat.
    for extra in sorted(Path(args.out).glob("*.json")):
        if extra.stem not in found:
            kept = json.loads(extra.read_text())
            if kept.get("latents") in (latents, subset):
                found[extra.stem] = kept
    for method, f in found.items():  # the searches' rows, every corpus window counted (see rows_from_results)
        saved = Path(args.out) / method / "results.json"
        if saved.is_file() and json.loads(saved.read_text())["run"].get("command") == "sae inputs":
            f["rows"] = rows_from_results(Path(args.out) / method)
    head = ("| method | best >= corpus max | median best/max | fluent >= corpus max | median fluent/max | "
            "median fluent xent | forwards per latent | wall | peak RSS |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"All {len(latents)} latents (median corpus-window xent, the fluency threshold: "
             f"{_median(found[next(iter(found))]['threshold']):.2f}):", "", head]
    for method, f in found.items():
        if method != "per-latent-5x":
            lines.append(_table_row(method, f["rows"], f))
    if "per-latent-5x" in found and "pooled" in found:
        pick = [latents.index(i) for i in subset]
        lines += ["", f"The first {len(subset)} latents:", "", head,
                  _table_row("pooled", [found["pooled"]["rows"][i] for i in pick],
                             {**found["pooled"], "forwards_total": found["pooled"]["forwards_total"] * len(subset) / len(latents),
                              "latents": subset}),
                  _table_row("per-latent, 5x steps", found["per-latent-5x"]["rows"], found["per-latent-5x"])]
    lines += _progress(args, found, latents, subset)
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "table.md").write_text(text + "\n")


def _progress(args, found: dict, latents: list[int], subset: list[int]) -> list[str]:
    """The searches' progress curves (curves.png) and how many fewer sequences per latent the
    pooled search needed to reach what per-latent search reached."""
    out = Path(args.out)
    runs = {m: histories(out / m) if m in found else None for m in ("pooled", "per-latent", "per-latent-5x")}
    # A longer pooled run of the same latents and seed (`featopt sae inputs --steps 25 --out
    # <out>/pooled-25`, see benchmarks/README.md) follows the same path further: its history is used.
    longer = histories(out / "pooled-25")
    pooled, name = (longer, "pooled-25") if longer and len(longer) == len(latents) else (runs["pooled"], "pooled")
    series, subset_series, lines = {}, {}, []
    if pooled:
        series[f"pooled ({name})"] = curve(pooled)
    if runs["per-latent"]:
        series["per-latent"] = curve(runs["per-latent"])
    if pooled and runs["per-latent-5x"]:
        pooled_sub = curve(pooled, [latents.index(i) for i in subset])
        long = curve(runs["per-latent-5x"])
        subset_series[f"pooled ({name})"] = pooled_sub
        subset_series["per-latent, 5x the steps"] = long
        lines += ["", f"Scored inputs per latent the pooled search needed to reach what per-latent search with 5x the "
                      f"steps had reached, on the first {len(subset)} latents (from the runs' histories):", "",
                  "| per-latent step | per-latent scored per latent | best / fluent >= corpus max | pooled needed | ratio |",
                  "|---|---|---|---|---|"]
        for step in range(0, len(long), max(1, len(long) // 10)):
            f, b, fl = long[step]
            need = forwards_to_match(pooled_sub, long[step])
            lines.append(f"| {step} | {f:,.0f} | {b} / {fl} | {'-' if need is None else f'{need:,.0f}'} | "
                         f"{'not reached' if need is None else f'{f / max(need, 1):.1f}x'} |")
    groups = {label: runs_ for label, runs_ in ((f"{len(latents)} latents", series),
                                                (f"the first {len(subset)}", subset_series)) if runs_}
    if groups:
        plot_curves(groups, out / "curves.png")
    return lines


if __name__ == "__main__":
    main()
