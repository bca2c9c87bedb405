"""Are the features of one neuron index aligned across layers? (source document 000, "Llama
features are aligned across layers", and its complete-search version: "the features of each neuron
at a given index are aligned across a range of layers"; "a learned phenomenon", absent when untrained.)

Each entry is one layer's exhaustive single-token sweep: problem f's top-k token set `T_l(f)`.
For two entries the overlap of problem f is `|T_l(f) & T_l'(f)| / k`, and the matrix holds its mean
over the problems. The baseline pairs problem f of entry l with problem `pi(f)` of entry l', `pi` a
fixed-seed derangement (no problem paired with itself): the overlap two unrelated features reach
by chance, which tokens that top many features raise above `k / vocab`. `top1` is the share of
problems whose best token is the same.

One `exhaustive.run` reads every layer in one forward (one per layer with `isolated`); `from_`
reads existing exhaustive `results.json` files instead, and entries of several files (isolated
and not, trained and untrained) go into one matrix, labelled by what differs.
`run(AlignConfig(...))` is the one entry point.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter, load_model, model_options
from featopt.models.sites import parse_site
from featopt.results import FeatureResult, atomic_write, read_results, versions
from featopt.discrete import exhaustive
from featopt.discrete.common import DTYPES, dumps_indented, out_dir, parse_indices, parse_layers


@dataclass
class AlignConfig:
    """Settings of one alignment run (the flags of `featopt align`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # start the model input with its BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int | str | None = None  # layers to compare, "0-29" or "0,4,8"; default: all (of the files, with from_)
    site: str | None = None  # one kind; default resid_post (with from_: the files' only kind)
    features: str | None = None  # default: every feature at the site, "[:, :, 0-(width-1)]"
    top_k: int = 10  # k of the top-k sets
    isolated: bool = False  # each block alone on the token's embedding (one sweep per layer)
    untrained: bool = False
    seed: int = 0  # untrained weights, and the baseline's permutation
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 0  # candidates per forward; 0: automatic
    from_: str | None = None  # exhaustive results.json files (or their folders), comma-separated: no sweep
    out: str | None = None  # default: featopt-runs/<time>
    progress: bool = True


@dataclass
class Entry:
    """One layer's sweep: `ids [problems, k]`, each problem's top-k token ids, best first."""

    label: str
    layer: int
    kind: str
    isolated: bool
    untrained: bool
    model: str
    seed: int | None
    dtype: str
    source: str
    specs: list[str]
    ids: Tensor


@dataclass
class AlignRun:
    entries: list[Entry]
    overlap: Tensor  # [E, E] mean top-k overlap
    baseline: Tensor  # [E, E] the same with problems of the second entry permuted
    top1: Tensor  # [E, E] share of problems with the same best token
    top1_baseline: Tensor
    out: Path


def derangement(n: int, seed: int) -> Tensor:
    """`[n]` a permutation without fixed points, the same for the same `(n, seed)`: uniform
    over derangements (a random permutation is redrawn until it has none, e tries on average)."""
    if n < 2:
        raise FeatoptError(f"the shuffled baseline needs at least two features, got {n}: select more with --features.")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


def shared(a: Tensor, b: Tensor) -> Tensor:
    """`a, b [F, k]` token ids, distinct within a row -> `[F]` how many ids rows share."""
    return (a[:, :, None] == b[:, None, :]).sum((1, 2))


def matrices(entries: list[Entry], perm: Tensor) -> tuple[Tensor, ...]:
    """`(overlap, baseline, top1, top1_baseline)`, each `[E, E]`, and the per-problem overlaps
    `[E, E, F]`. The baseline matrix is not symmetric: entry j's problems are the permuted ones."""
    n, (F, k) = len(entries), entries[0].ids.shape
    per = torch.zeros(n, n, F, dtype=torch.float64)
    base = torch.zeros(n, n, dtype=torch.float64)
    top1, top1_base = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i, a in enumerate(entries):
        for j, b in enumerate(entries):
            if j >= i:
                per[i, j] = per[j, i] = shared(a.ids, b.ids).double() / k
                top1[i, j] = top1[j, i] = (a.ids[:, 0] == b.ids[:, 0]).double().mean()
            base[i, j] = shared(a.ids, b.ids[perm]).double().mean() / k
            top1_base[i, j] = (a.ids[:, 0] == b.ids[perm, 0]).double().mean()
    return per.mean(-1), base, top1, top1_base, per


def _check(config: AlignConfig) -> None:
    if config.top_k < 1:
        raise FeatoptError(f"--top_k must be at least 1, got {config.top_k}.")
    if config.site is not None and "," in config.site:
        raise FeatoptError(f"--site {config.site!r} names several kinds: align takes one (run it once per kind).")
    if config.layer is not None and len(parse_indices(config.layer, 1 << 30, "--layer", "layer")) < 2:
        raise FeatoptError(f"--layer {config.layer!r} gives one layer: alignment compares at least two, e.g. 0-29 or 0,4,8.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")


def _entries(path: str, run: dict, results: list[FeatureResult], top_k: int) -> list[Entry]:
    """One entry per site of an exhaustive run, its problems in spec order."""
    settings = run.get("config") or {}
    by_site: dict[str, list[FeatureResult]] = {}
    for r in results:
        by_site.setdefault(r.site, []).append(r)
    entries = []
    for name, rs in by_site.items():
        site = parse_site(name)
        ids = [r.extra.get("top_k", {}).get("token_ids") for r in rs]
        if any(row is None for row in ids):
            raise FeatoptError(f"--from {path} has results without their top-k tokens: give an exhaustive results.json.")
        if min(map(len, ids)) < top_k:
            raise FeatoptError(f"--from {path} keeps {min(map(len, ids))} tokens per feature, fewer than --top_k "
                               f"{top_k}: give --top_k {min(map(len, ids))} or less.")
        entries.append(Entry("", site.layer, site.kind, bool(settings.get("isolated")), bool(settings.get("untrained")),
                             str(run.get("model", "")), settings.get("seed"), rs[0].dtype, path, [r.spec for r in rs],
                             torch.tensor([row[:top_k] for row in ids])))
    return entries


def _files(path: str) -> list[Path]:
    """A file itself; a folder's results.json, else those one or two folders down (an isolated
    align run's `exhaustive/layerL/`), in natural order (layer2 before layer10)."""
    folder = Path(path)
    if not folder.is_dir() or (folder / "results.json").exists():
        return [folder / "results.json" if folder.is_dir() else folder]
    found = [*folder.glob("*/results.json"), *folder.glob("*/*/results.json")]
    key = [[int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(f))] for f in found]
    return [f for _, f in sorted(zip(key, found))] or [folder / "results.json"]


def read_sweeps(paths: str, top_k: int) -> list[Entry]:
    """Every site of the exhaustive `results.json` files `paths` (comma-separated; a folder
    means its results.json, or those in its subfolders), file by file."""
    entries = []
    for path, file in ((p, f) for p in paths.split(",") if p.strip() for f in _files(p.strip())):
        try:
            run, results = read_results(file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise FeatoptError(f"--from {path} is not a readable results.json ({type(error).__name__}): give one "
                               "written by featopt search exhaustive, or its folder.") from None
        if run.get("method") != "exhaustive" or not results:
            raise FeatoptError(f"--from {path} holds {run.get('method')!r} results, not an exhaustive sweep's: give a "
                               "results.json written by featopt search exhaustive (or by featopt align, under exhaustive/).")
        entries += _entries(path, run, results, top_k)
    return entries


def _select(entries: list[Entry], config: AlignConfig) -> list[Entry]:
    """The entries of `config.site`'s kind at `config.layer`, labelled by what tells them apart."""
    kinds = list(dict.fromkeys(e.kind for e in entries))
    if config.site is not None:
        kinds = [parse_site(config.site, 0).kind]
    elif len(kinds) > 1:
        raise FeatoptError(f"the --from files hold several site kinds ({', '.join(kinds)}): choose one with --site.")
    chosen = [e for e in entries if e.kind == kinds[0]]
    if config.layer is not None:
        layers = parse_indices(config.layer, 1 << 30, "--layer", "layer")
        missing = sorted(set(layers) - {e.layer for e in chosen})
        if missing:
            raise FeatoptError(f"--layer {config.layer!r}: the --from files have no {kinds[0]} sweep at layer(s) "
                               f"{', '.join(map(str, missing))}.")
        chosen = [e for e in chosen if e.layer in layers]
    if len(chosen) < 2:
        raise FeatoptError(f"the --from files hold {len(chosen)} {kinds[0]} sweep(s): alignment compares at least two layers.")
    if any(e.specs != chosen[0].specs for e in chosen):
        raise FeatoptError("the --from files sweep different features: alignment compares the same feature indices.")
    base = {e.model.split(" (untrained")[0] for e in chosen}  # an untrained model's name adds "(untrained, seed s)"
    seeds = {e.seed for e in chosen if e.untrained}
    for e in chosen:
        e.label = f"L{e.layer}" + (" iso" if e.isolated else "") + (" untrained" if e.untrained else "")
        e.label += f" {e.model.split(' (untrained')[0]}" if len(base) > 1 else ""
        e.label += f" seed {e.seed}" if e.untrained and len(seeds) > 1 else ""
    labels = [e.label for e in chosen]
    if len(set(labels)) < len(labels):
        raise FeatoptError(f"the --from files hold the same sweep twice ({max(set(labels), key=labels.count)}): give each once.")
    return chosen


def _sweep(config: AlignConfig, out: Path, adapter: ModelAdapter | None) -> list[Entry]:
    """`exhaustive.run` over the config's layers (each alone with `isolated`); its results go to
    `out/exhaustive` and are read back as entries."""
    if adapter is None:
        adapter = load_model(config.model, untrained=config.untrained, seed=config.seed, dtype=DTYPES[config.dtype],
                             **model_options(config))
    kind = parse_site(config.site, 0).kind
    layers = parse_layers(config.layer if config.layer is not None else f"0-{adapter.n_layers - 1}", adapter.n_layers)
    if len(layers) < 2:
        raise FeatoptError(f"{config.model} has {adapter.n_layers} layer(s): alignment compares at least two.")
    width = adapter.width(adapter.site(kind, layers[0]))
    features = config.features or f"[:, :, 0-{width - 1}]"
    derangement(len(parse_features(features, n_tokens=1, width=width)), config.seed)  # fails before any sweep
    sweep = exhaustive.ExhaustiveConfig(
        model=config.model, bos=config.bos, trust_remote_code=config.trust_remote_code, site=kind, features=features,
        top_k=config.top_k, batch_size=config.batch_size, isolated=config.isolated, untrained=config.untrained, seed=config.seed, dtype=config.dtype,
        device=config.device, progress=config.progress)
    groups = [[layer] for layer in layers] if config.isolated else [layers]  # an isolated block runs alone
    entries = []
    for group in groups:
        where = out / "exhaustive" / (f"layer{group[0]}" if config.isolated else "")
        done = exhaustive.run(replace(sweep, layer=",".join(map(str, group)), out=str(where)), adapter)
        meta = {"method": "exhaustive", "model": adapter.name, "config": asdict(replace(sweep, layer=group))}
        entries += _entries(str(where / "results.json"), meta, done.results, config.top_k)
    return entries


def run(config: AlignConfig, adapter: ModelAdapter | None = None) -> AlignRun:
    """Sweep (or read) every layer, compare each pair, write `out/align.json` and `out/align.png`.
    `adapter`, when given, is swept instead of loading `config.model`."""
    _check(config)
    out = out_dir(config)
    sweeps = read_sweeps(config.from_, config.top_k) if config.from_ else _sweep(config, out, adapter)
    entries = _select(sweeps, config)
    perm = derangement(len(entries[0].specs), config.seed)
    overlap, baseline, top1, top1_baseline, per = matrices(entries, perm)
    result = AlignRun(entries, overlap, baseline, top1, top1_baseline, out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(i, j) for i in range(len(entries)) for j in range(i + 1, len(entries))]
    document = {
        "run": {"method": "align", "config": asdict(config), "model": entries[0].model, "top_k": config.top_k,
                "seed": config.seed, "dtypes": sorted({e.dtype for e in entries}), "versions": versions(),
                "entries": [{f.name: getattr(e, f.name) for f in fields(Entry) if f.name not in ("ids", "specs")}
                            for e in entries],
                "specs": entries[0].specs, "permutation": perm.tolist()},
        "labels": [e.label for e in entries],
        "overlap": overlap.tolist(), "baseline": baseline.tolist(),
        "top1": top1.tolist(), "top1_baseline": top1_baseline.tolist(),
        "summary": summary(result),
        "per_feature": {"pairs": [list(p) for p in pairs], "overlap": [per[i, j].tolist() for i, j in pairs]},
    }
    text = dumps_indented(document)
    atomic_write(out / "align.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot(result, out / "align.png")
    return result


def summary(result: AlignRun) -> dict:
    """Each entry against the one before it and against the first, pairs of entries at the same
    layer; the means over adjacent and over all pairs."""
    o, b, t, tb = result.overlap, result.baseline, result.top1, result.top1_baseline

    def pair(i: int, j: int) -> dict:
        return {"a": result.entries[i].label, "b": result.entries[j].label, "overlap": float(o[i, j]),
                "baseline": float(b[i, j]), "top1": float(t[i, j]), "top1_baseline": float(tb[i, j])}

    n, entries = len(result.entries), result.entries
    adjacent = [pair(i - 1, i) for i in range(1, n)]
    off = ~torch.eye(n, dtype=torch.bool)
    return {"adjacent": adjacent, "from_first": [pair(0, i) for i in range(1, n)],
            # the same layer in two runs (isolated and not, trained and untrained): with --from
            "same_layer": [pair(i, j) for i in range(n) for j in range(i + 1, n) if entries[i].layer == entries[j].layer],
            "mean_adjacent": sum(p["overlap"] for p in adjacent) / len(adjacent),
            "mean_adjacent_baseline": sum(p["baseline"] for p in adjacent) / len(adjacent),
            "mean_all_pairs": float(o[off].mean()), "mean_all_pairs_baseline": float(b[off].mean())}


def format_table(result: AlignRun) -> str:
    """One row per entry: its overlap with the entry before it and with the first, each with the
    shuffled baseline, and the share of features whose best token is the same."""
    s = summary(result)
    rows = [["entry", "vs previous (baseline)", "top-1 same", "vs first (baseline)", "top-1 same"]]
    for prev, first in zip(s["adjacent"], s["from_first"]):
        rows.append([prev["b"], f"{prev['overlap']:.3f} ({prev['baseline']:.3f})", f"{prev['top1']:.3f}",
                     f"{first['overlap']:.3f} ({first['baseline']:.3f})", f"{first['top1']:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for p in s["same_layer"]:
        lines.append(f"{p['a']} vs {p['b']}: overlap {p['overlap']:.3f} (baseline {p['baseline']:.3f}), "
                     f"top-1 same {p['top1']:.3f} (baseline {p['top1_baseline']:.3f})")
    k, F = result.entries[0].ids.shape[1], len(result.entries[0].specs)
    lines.append(f"mean top-{k} overlap over {F} features: adjacent entries {s['mean_adjacent']:.3f} "
                 f"(baseline {s['mean_adjacent_baseline']:.3f}), all pairs {s['mean_all_pairs']:.3f} "
                 f"(baseline {s['mean_all_pairs_baseline']:.3f}); first entry {result.entries[0].label}")
    return "\n".join(lines)


def plot(result: AlignRun, path: Path) -> Path:
    """Two heatmaps on one colour scale: the mean overlap, and its shuffled baseline."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [e.label for e in result.entries]
    step = max(1, len(labels) // 10)  # at most about ten tick labels per axis
    k, first = result.entries[0].ids.shape[1], result.entries[0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    for ax, matrix, title in ((axes[0], result.overlap, f"mean top-{k} overlap, feature f vs f"),
                              (axes[1], result.baseline, "baseline: f vs shuffled pi(f)")):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ticks = list(range(0, len(labels), step))
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    what = first.model + (f", untrained (seed {first.seed})" if first.untrained else "")
    fig.suptitle(f"{what}: {len(first.specs)} features at {first.kind}", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
