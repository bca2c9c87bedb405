"""`featopt align`: are the features of one index aligned across layers? One exhaustive sweep reads
every layer (one per layer with `--isolated`), or `--from` reads exhaustive results.json files that
exist (entries of several files, isolated and not, trained and untrained, go into one matrix,
labelled by what differs); `featopt.discrete.align` compares them. Writes `align.json` and
`align.png`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from featopt.commands.fields import record_of
from featopt.commands.loading import load_for
from featopt.commands.result import CommandResult
from featopt.commands.search import ExhaustiveConfig, exhaustive
from featopt.commands.settings import InputSettings, OutputSettings, UntrainedSettings
from featopt.commands.tables import aligned
from featopt.discrete.align import Alignment, Entry, derangement, matrices, plot, summary
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.models.sites import parse_site
from featopt.results import FeatureResult, atomic_write, dumps_indented, read_results, versions
from featopt.runs.outdir import out_folder
from featopt.specs import parse_features, parse_indices, parse_layers


@dataclass
class AlignConfig(OutputSettings, UntrainedSettings, InputSettings):
    """Settings of one alignment run (the flags of `featopt align`)."""

    model: str = "tiny-gpt2"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    layer: int | str | None = None
    """layers to compare, at least two: 0-29 or 0,4,8 (default: every layer; with --from, every layer in the files)"""
    site: str | None = None
    """one kind: resid_post (default), resid_pre, attn_out, mlp_out, mlp_hidden (with --from: the files' only kind)"""
    features: str | None = None
    """problems, the same at every layer (default: every feature of the site, "[:, :, 0-(width-1)]")"""
    objective: str = "maximize"
    """what the sweeps rank tokens by (as in search exhaustive)"""
    top_k: int = 10
    """size of each feature's top-k token set"""
    isolated: bool = False
    """each block alone on the token's embedding (one sweep per layer)"""
    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda"""
    batch_size: int = 0
    """candidates per forward (0: automatic, halved on out-of-memory)"""
    from_: str | None = None
    """exhaustive results.json files (or folders), comma-separated: align them instead of sweeping (the model flags are
    then unused)"""


class AlignRun(Alignment, CommandResult):
    def table(self) -> str:
        return format_table(self)


def _check(config: AlignConfig) -> None:
    if config.top_k < 1:
        raise FeatoptError(f"--top_k must be at least 1, got {config.top_k}.")
    if config.site is not None and "," in config.site:
        raise FeatoptError(f"--site {config.site!r} names several kinds: align takes one (run it once per kind).")
    if config.layer is not None and len(parse_indices(config.layer, 1 << 30, "--layer", "layer")) < 2:
        raise FeatoptError(f"--layer {config.layer!r} gives one layer: alignment compares at least two, e.g. 0-29 or 0,4,8.")
    dtype_of(config.dtype)


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
    adapter = load_for(config, adapter, move=False)
    kind = parse_site(config.site, 0).kind
    layers = parse_layers(config.layer if config.layer is not None else f"0-{adapter.n_layers - 1}", adapter.n_layers)
    if len(layers) < 2:
        raise FeatoptError(f"{config.model} has {adapter.n_layers} layer(s): alignment compares at least two.")
    width = adapter.width(adapter.site(kind, layers[0]))
    features = config.features or f"[:, :, 0-{width - 1}]"
    derangement(len(parse_features(features, n_tokens=1, width=width)), config.seed)  # fails before any sweep
    sweep = ExhaustiveConfig(
        model=config.model, bos=config.bos, trust_remote_code=config.trust_remote_code, site=kind, features=features,
        objective=config.objective, top_k=config.top_k, batch_size=config.batch_size, isolated=config.isolated, untrained=config.untrained, seed=config.seed, dtype=config.dtype,
        device=config.device, progress=config.progress)
    groups = [[layer] for layer in layers] if config.isolated else [layers]  # an isolated block runs alone
    entries = []
    for group in groups:
        where = out / "exhaustive" / (f"layer{group[0]}" if config.isolated else "")
        done = exhaustive(replace(sweep, layer=",".join(map(str, group)), out=str(where)), adapter)
        meta = {"method": "exhaustive", "model": adapter.name, "config": record_of(replace(sweep, layer=group))}
        entries += _entries(str(where / "results.json"), meta, done.results, config.top_k)
    return entries


def align(config: AlignConfig, adapter: ModelAdapter | None = None) -> AlignRun:
    """Sweep (or read) every layer, compare each pair, write `out/align.json` and `out/align.png`.
    `adapter`, when given, is swept instead of loading `config.model`."""
    _check(config)
    out = out_folder(config.out)
    sweeps = read_sweeps(config.from_, config.top_k) if config.from_ else _sweep(config, out, adapter)
    entries = _select(sweeps, config)
    perm = derangement(len(entries[0].specs), config.seed)
    overlap, baseline, top1, top1_baseline, per = matrices(entries, perm)
    result = AlignRun(entries, overlap, baseline, top1, top1_baseline, out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(i, j) for i in range(len(entries)) for j in range(i + 1, len(entries))]
    document = {
        "run": {"method": "align", "config": record_of(config), "model": entries[0].model, "top_k": config.top_k,
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


def format_table(result: AlignRun) -> str:
    """One row per entry: its overlap with the entry before it and with the first, each with the
    shuffled baseline, and the share of features whose best token is the same."""
    s = summary(result)
    rows = [["entry", "vs previous (baseline)", "top-1 same", "vs first (baseline)", "top-1 same"]]
    for prev, first in zip(s["adjacent"], s["from_first"]):
        rows.append([prev["b"], f"{prev['overlap']:.3f} ({prev['baseline']:.3f})", f"{prev['top1']:.3f}",
                     f"{first['overlap']:.3f} ({first['baseline']:.3f})", f"{first['top1']:.3f}"])
    lines = aligned(rows).split("\n")
    for p in s["same_layer"]:
        lines.append(f"{p['a']} vs {p['b']}: overlap {p['overlap']:.3f} (baseline {p['baseline']:.3f}), "
                     f"top-1 same {p['top1']:.3f} (baseline {p['top1_baseline']:.3f})")
    k, F = result.entries[0].ids.shape[1], len(result.entries[0].specs)
    lines.append(f"mean top-{k} overlap over {F} features: adjacent entries {s['mean_adjacent']:.3f} "
                 f"(baseline {s['mean_adjacent_baseline']:.3f}), all pairs {s['mean_all_pairs']:.3f} "
                 f"(baseline {s['mean_all_pairs_baseline']:.3f}); first entry {result.entries[0].label}")
    return "\n".join(lines)


