"""Data-free flow predecessors against data-dependent attribution graphs (document 003 vs issue 26).

Feature flow links a feature of layer L to the layer L-1 feature whose decoder row has the largest
cosine with its own, without data (`featopt.feature_flow.match`). An attribution graph measures, on
one prompt, the direct effect of every active transcoder feature on every later one. For every kept
feature node (layer L >= 1) of each graph, this asks whether its top-1 flow predecessor in L-1 is
active in the prompt, has an edge into it, how that edge ranks among the feature's incoming feature
edges (by |weight|), whether the pruned graph kept it, and its share of the row's total |weight|;
and the converse: the decoder-cosine rank of the feature's strongest L-1 source. Baselines: a
random latent of L-1, the flow top-1 of a random latent of L (hubs), and the average over the
active L-1 latents. For reference only (not
featopt's flow), the top-1 by cosine of the feature's *encoder* column with L-1's decoder rows:
that is the direction an edge's weight is made of.

The L-1 match is `match(flow, (L, "mlp"), (L-1, "mlp"))`, what `featopt flow match --target L/mlp
--candidates L-1/mlp` computes; with transcoders alone (no residual SAEs) FlowSet makes `L-1/mlp` the
predecessor of `L/mlp`, so the picture's flow graph is `featopt flow graph --saes <transcoders>`'s.

    . .venv/bin/activate && G=featopt-runs/graphs-smollm2 && python benchmarks/bench_flow_vs_graph.py \
        --transcoders featopt-runs/transcoders-smollm2-all-v2 \
        --graphs $G/capital $G/plural-agreement $G/closing-bracket $G/antonym $G/two-step-fact \
        featopt-runs/graph-v2-count --out featopt-runs/bench-flow-vs-graph-v3 [--feature two-step-fact:2_174_5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from featopt.attribution.files import load_graph
from featopt.feature_flow.graph import flow_graph, plot_graph
from featopt.feature_flow.match import match, top_matches
from featopt.feature_flow.saes import FlowSet

# "shuffled": the flow top-1 of a random latent of layer L (controls for hub latents that are many
# features' top-1); "active": the mean over the active L-1 latents; "encoder": reference, not flow
CANDIDATES = ("flow", "random", "shuffled", "active", "encoder")
MODES = ("same", "any")  # same position as the feature, or any position <= the feature's


def edge_stats(row, total, ranks, kept, target, source):
    """What the attribution graph says about edge source -> target (`source` None: not active);
    `row` the target's weights (a list), `total` their sum of |weight| over every source."""
    if source is None:
        return {"active": 0, "nonzero": 0, "top5": 0, "kept": 0, "share": 0.0, "rank": None}
    w = row[source]
    return {"active": 1, "nonzero": int(w != 0), "top5": int(w != 0 and ranks[source] <= 5),
            "kept": int((target, source) in kept), "share": abs(w) / max(total, 1e-30),
            "rank": ranks[source] if w != 0 else None}


def analyse(folder: Path, flow_top1, flow_cos, enc_top1, W_dec, seed: int) -> tuple[list[dict], dict]:
    g = load_graph(folder / "graph.safetensors")
    doc = json.loads((folder / "graph.json").read_text())
    nf = len(g.features)
    feats = g.features.tolist()
    index = {tuple(f): n for n, f in enumerate(feats)}  # (layer, position, latent) -> node

    def node(node_id):  # feature node ids are "layer_latent_position"
        layer, latent, pos = map(int, node_id.split("_"))
        return index[(layer, pos, latent)]

    ids = {n["node_id"] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"}
    kept_nodes = sorted(node(i) for i in ids)
    kept = {(node(e["target"]), node(e["source"])) for e in doc["links"] if e["source"] in ids and e["target"] in ids}
    gen = torch.Generator().manual_seed(seed)
    records = []
    for t in kept_nodes:
        L, p, i = feats[t]
        if L == 0:
            continue
        row, total = g.adjacency[t].tolist(), float(g.adjacency[t].abs().sum())
        # rank of every feature source among the row's feature sources by |weight| (1 = strongest);
        # sources that cannot reach it (later layers or positions) have weight 0 and rank last
        order = g.adjacency[t, :nf].abs().argsort(descending=True)
        ranks = torch.empty(nf, dtype=torch.long)
        ranks[order] = torch.arange(1, nf + 1)
        ranks = ranks.tolist()
        prev = [s for s in range(nf) if feats[s][0] == L - 1 and feats[s][1] <= p]
        by_latent: dict[str, dict[int, int]] = {"same": {}, "any": {}}
        for s in prev:  # per latent: its node at p, and its strongest node at any position <= p
            q, j = feats[s][1], feats[s][2]
            if q == p:
                by_latent["same"][j] = s
            best = by_latent["any"].get(j)
            if best is None or abs(row[s]) > abs(row[best]):
                by_latent["any"][j] = s
        picks = {"flow": int(flow_top1[L][i]), "encoder": int(enc_top1[L][i]),
                 "random": int(torch.randint(W_dec[L - 1].shape[0], (1,), generator=gen)),
                 "shuffled": int(flow_top1[L][int(torch.randint(W_dec[L].shape[0], (1,), generator=gen))])}
        rec = {"graph": folder.name, "layer": L, "position": p, "latent": i, "node": t,
               "flow_latent": picks["flow"], "flow_cosine": float(flow_cos[L][i]), "encoder_latent": picks["encoder"]}
        for mode in MODES:
            for cand, j in picks.items():
                rec[f"{cand}_{mode}"] = edge_stats(row, total, ranks, kept, t, by_latent[mode].get(j))
            actives = [edge_stats(row, total, ranks, kept, t, s) for s in by_latent[mode].values()]
            rec[f"active_{mode}"] = {k: statistics.mean(a[k] for a in actives) if actives else None
                                     for k in ("active", "nonzero", "top5", "kept", "share")}
        # converse: the strongest L-1 source's rank by decoder cosine with the feature (1 = flow top-1)
        if prev and max(abs(row[s]) for s in prev) > 0:
            s = max(prev, key=lambda s: abs(row[s]))
            j = feats[s][2]
            _, ranking = top_matches(W_dec[L][i:i + 1], W_dec[L - 1], W_dec[L - 1].shape[0])
            where = {int(x): r + 1 for r, x in enumerate(ranking[0].tolist())}
            others = [where[k] for k in by_latent["any"] if k != j]
            rec["converse"] = {"latent": j, "cos_rank": where[j], "feature_rank": ranks[s],
                               "active_mean_cos_rank": statistics.mean(others) if others else None}
        records.append(rec)
    return records, {"prompt": doc["metadata"]["prompt"], "tokens": doc["metadata"]["prompt_tokens"], "graph": g,
                     "kept": kept, "ids": ids, "doc": doc}


def band_of(layer: int, n_layers: int) -> str:
    return "early" if layer < n_layers / 3 else "middle" if layer < 2 * n_layers / 3 else "late"


def summarise(records: list[dict]) -> dict:
    out = {"features": len(records)}
    for cand in CANDIDATES:
        for mode in MODES:
            rows = [r[f"{cand}_{mode}"] for r in records if r[f"{cand}_{mode}"]["active"] is not None]
            if not rows:
                continue
            m = {k: statistics.mean(r[k] for r in rows) for k in ("active", "nonzero", "top5", "kept", "share")}
            for k in ("top5", "kept", "share"):  # among the features whose candidate is active
                m[f"{k}_given_active"] = m[k] / m["active"] if m["active"] else None
            out[f"{cand}_{mode}"] = m
    conv = [r["converse"] for r in records if "converse" in r]
    if conv:
        out["converse"] = {"n": len(conv), "median_cos_rank": statistics.median(c["cos_rank"] for c in conv),
                           "rank1": statistics.mean(c["cos_rank"] == 1 for c in conv),
                           "top5": statistics.mean(c["cos_rank"] <= 5 for c in conv),
                           "median_active_cos_rank": statistics.median(
                               c["active_mean_cos_rank"] for c in conv if c["active_mean_cos_rank"] is not None)}
    return out


def table(name: str, s: dict, modes=MODES) -> list[str]:
    lines = [f"{name}: {s['features']} kept features (layer >= 1)",
             f"  {'predecessor, position':<33} {'active':>7} {'edge':>7} {'top-5':>7} {'kept':>7} {'top-5|act':>9} "
             f"{'kept|act':>9} {'share|act':>9}"]
    labels = {"flow": "flow top-1", "random": "random L-1 latent", "shuffled": "top-1 of random L latent",
              "active": "mean active L-1", "encoder": "enc.dec top-1 (ref)"}
    for mode in modes:
        for cand in CANDIDATES:
            m = s.get(f"{cand}_{mode}")
            if m:
                given = ["-" if m[f"{k}_given_active"] is None else f"{m[f'{k}_given_active']:.{d}f}"
                         for k, d in (("top5", 3), ("kept", 3), ("share", 4))]
                lines.append(f"  {labels[cand] + ', ' + mode:<33} {m['active']:>7.3f} {m['nonzero']:>7.3f} "
                             f"{m['top5']:>7.3f} {m['kept']:>7.3f} {given[0]:>9} {given[1]:>9} {given[2]:>9}")
    if "converse" in s:
        c = s["converse"]
        lines.append(f"  converse: strongest L-1 source's decoder-cosine rank: median {c['median_cos_rank']:.0f} "
                     f"(random active L-1 latent: {c['median_active_cos_rank']:.0f}), rank 1 {c['rank1']:.3f}, "
                     f"top-5 {c['top5']:.3f} (n {c['n']})")
    return lines


def picture(rec: dict, info: dict, flow: FlowSet, out: Path, back: int, k: int) -> Path:
    """Left: the feature's data-free flow graph (backward, `back` layers, k matches per step), each
    node labelled with its activation in the prompt; right: its 12 strongest incoming edges."""
    from featopt.plots import pyplot, save_figure

    g, tokens = info["graph"], info["tokens"]
    L, p, i, t = rec["layer"], rec["position"], rec["latent"], rec["node"]
    sub = FlowSet({key: flow.saes[key] for key in flow.keys() if L - back <= key[0] <= L}, flow.paths)
    fg = flow_graph(sub, f"{L}/mlp/{i}", k=k, threshold=0.0, direction="backward")
    acts = {}
    for (layer, pos, latent), a in zip(g.features.tolist(), g.activations.tolist()):
        if pos <= p:
            acts.setdefault((layer, latent), []).append(f"a={a:.1f}@{pos}")
    for n, attrs in fg.nodes.items():
        attrs["label"] = " ".join(acts.get((n.layer, n.index), [])[-2:]) or "inactive"
    flow_png = plot_graph(fg, out / "flow_graph.png", title=f"flow graph of {L}/mlp/{i} (decoder cosine, no data)")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.5, 1]})
    left.imshow(plt.imread(flow_png))
    left.axis("off")
    row, nf, ranges = g.adjacency[t], len(g.features), g.node_ranges()
    top = row.abs().argsort(descending=True)[:12].tolist()
    names, colours = [], []
    for s in top:
        if s < nf:
            sl, sp, sj = g.features[s].tolist()
            names.append(f"{sl}/mlp/{sj} @{sp}{repr(tokens[sp])}")
            colours.append("#DD8452" if (sl == L - 1 and sj == rec["flow_latent"]) else "#4C72B0" if sl == L - 1 else "0.6")
        elif s < ranges["errors"][1]:
            sl, sp = divmod(s - nf, g.n_pos)
            names.append(f"error {sl} @{sp}")
            colours.append("#C44E52")
        else:
            sp = s - ranges["tokens"][0]
            names.append(f"token {tokens[sp]!r} @{sp}")
            colours.append("#8172B2")
    right.barh(range(len(top))[::-1], [float(row[s]) for s in top], color=colours)
    right.set_yticks(range(len(top))[::-1], names, fontsize=7)
    right.axvline(0, color="0.3", lw=0.6)
    st = rec["flow_any"]
    said = (f"flow top-1 {L - 1}/mlp/{rec['flow_latent']} (cos {rec['flow_cosine']:.2f}): " +
            (f"rank {st['rank']} among feature edges, share {st['share']:.1%}" if st["nonzero"] else
             "active, no edge" if st["active"] else "not active in the prompt"))
    right.set_title(f"incoming edges of {L}/mlp/{i} @{p}{tokens[p]!r} on\n{info['prompt']!r}\n{said}", fontsize=8)
    right.set_xlabel("direct effect (orange: flow top-1, blue: other L-1 features)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, out / "flow_vs_graph.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transcoders", required=True, help="folder of per-layer transcoders (the graphs' own)")
    ap.add_argument("--graphs", nargs="+", required=True, help="attribution graph folders (featopt graph build)")
    ap.add_argument("--out", default="featopt-runs/bench-flow-vs-graph")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-latent baseline")
    ap.add_argument("--feature", default=None, help="picture: GRAPH_FOLDER_NAME:LAYER_LATENT_POS (default: the "
                                                     "first graph's most influential kept feature of layer >= 2 past position 0)")
    ap.add_argument("--back", type=int, default=2, help="picture: layers the flow graph goes back")
    ap.add_argument("--flow_k", type=int, default=2, help="picture: matches per step of the flow graph")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flow = FlowSet.load(args.transcoders)
    n_layers = max(flow.layers) + 1
    W_dec = {L: flow[(L, "mlp")].W_dec.detach().float() for L in flow.layers}
    flow_top1, flow_cos, enc_top1 = {}, {}, {}
    for L in flow.layers[1:]:  # featopt's data-free matching, layer L's decoder rows against L-1's
        m = match(flow, (L, "mlp"), (L - 1, "mlp"), 1)
        flow_top1[L], flow_cos[L] = m.indices[:, 0], m.scores[:, 0]
        # reference: encoder columns (what reads L-1's writes) against L-1's decoder rows
        enc_top1[L] = top_matches(flow[(L, "mlp")].W_enc.detach().float().T, W_dec[L - 1], 1)[1][:, 0]
    records, infos = [], {}
    for folder in map(Path, args.graphs):
        recs, infos[folder.name] = analyse(folder, flow_top1, flow_cos, enc_top1, W_dec, args.seed)
        records += recs
    settings = {n: json.loads((Path(f) / "summary.json").read_text()).get("settings", {})
                for n, f in zip(infos, args.graphs) if (Path(f) / "summary.json").is_file()}
    results = {"transcoders": args.transcoders,
               "graphs": {n: {"prompt": i["prompt"], "settings": settings.get(n)} for n, i in infos.items()},
               "modes": {"same": "the L-1 latent's node at the feature's position",
                         "any": "its strongest node at any position <= the feature's"},
               "all": summarise(records)}
    lines = table("all graphs", results["all"])
    for name in infos:
        results[name] = summarise([r for r in records if r["graph"] == name])
        lines += table(f"{name} ({infos[name]['prompt']!r})", results[name], ("any",))
    for band in ("early", "middle", "late"):
        chosen = [r for r in records if band_of(r["layer"], n_layers) == band]
        if chosen:
            results[band] = summarise(chosen)
            lines += table(f"{band} layers (all graphs)", results[band], ("any",))
    # position 0 without a BOS token is an attention sink whose features dominate such graphs; a graph
    # built with --bos and --skip_first 1 (the CLI's defaults since) has no features there
    for where, chosen in (("first position", [r for r in records if r["position"] == 0]),
                          ("later positions", [r for r in records if r["position"] > 0])):
        if chosen:
            results[where] = summarise(chosen)
            lines += table(f"{where} (all graphs)", results[where], ("any",))
    flow_cos_all = torch.cat([flow_cos[L] for L in flow_cos])
    lines.append(f"flow top-1 decoder cosine over all latents: mean {float(flow_cos_all.mean()):.3f}, "
                 f"{float((flow_cos_all >= 0.3).float().mean()):.2%} >= 0.3; over the kept features: mean "
                 f"{statistics.mean(r['flow_cosine'] for r in records):.3f}")
    print("\n".join(lines))
    if args.feature:
        gname, nid = args.feature.split(":")
        layer, latent, pos = map(int, nid.split("_"))
        rec = next(r for r in records if (r["graph"], r["layer"], r["latent"], r["position"]) == (gname, layer, latent, pos))
    else:  # the most influential kept feature of layer >= 2 past the first token (which every
        # position attends to, so its features are the prompt's least specific)
        gname = next(iter(infos))
        influence = {n["node_id"]: n["influence"] for n in infos[gname]["doc"]["nodes"]}
        rec = min((r for r in records if r["graph"] == gname and r["layer"] >= 2 and r["position"] > 0),
                  key=lambda r: influence[f"{r['layer']}_{r['latent']}_{r['position']}"])
    png = picture(rec, infos[gname], flow, out, args.back, args.flow_k)
    results["picture"] = {"graph": gname, "feature": f"{rec['layer']}_{rec['latent']}_{rec['position']}", "png": str(png)}
    results["per_feature"] = records
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.json'}, {png}")


if __name__ == "__main__":
    main()
