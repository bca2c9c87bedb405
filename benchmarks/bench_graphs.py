"""Attribution graphs of five prompts of known behaviour on SmolLM2-135M with the recipe's 30
transcoders (issue 26): for each, the graph (scores, size, the top path in words, time) and one
intervention that tests it, twice (see `interventions`): features of the largest total effect on the
answer zeroed, the graph's predicted change of the answer's logit beside the model's, errors frozen
and unfrozen; "agree" means the same sign and within TOLERANCE of the measured change.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_graphs.py \\
        --transcoders featopt-runs/transcoders-smollm2-2m --out featopt-runs/graphs-smollm2

Writes one `featopt graph build` folder per prompt (graph.json, graph.html, graph.png, summary.json,
intervention.json) and `graphs.json` / `graphs.md` with the table below them.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

PROMPTS = [  # (name, prompt, the answer the graph explains); the model's probability is in the table
    ("capital", "The capital of France is", " Paris"),
    ("plural agreement", "The keys to the cabinet", " are"),
    ("closing bracket", "(a + b", ")"),
    ("antonym", "The opposite of hot is", " cold"),
    ("two-step fact", "The language spoken in the country whose capital is Paris is", " French"),
]
TOLERANCE = 0.5  # a prediction "agrees" when it has the measured sign and is within 50% of it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--transcoders", required=True)
    parser.add_argument("--out", default="featopt-runs/graphs-smollm2")
    parser.add_argument("--top", type=int, default=3, help="features zeroed in the second intervention")
    parser.add_argument("--only", default="", help="comma-separated prompt names (default: all five)")
    # SmolLM2's documents are separated by <|endoftext|> in pretraining; its BOS token <|im_start|> (what
    # --bos and circuit-tracer prepend) opens a chat turn and lowers ' are' after "The keys to the cabinet"
    # from 0.37 to 0.03. Position 0 is left out of the graph either way (--skip_first 1).
    parser.add_argument("--prefix", default="<|endoftext|>", help="text before each prompt, its first token at "
                        "position 0 (empty: the model's BOS token instead)")
    parser.add_argument("--reuse", action="store_true", help="keep graphs already built in --out (their time as "
                        "recorded); redo the top path and the interventions")
    args = parser.parse_args()

    import featopt
    from featopt.models import load_model

    adapter = load_model(args.model)
    out = Path(args.out)
    rows = []
    for name, prompt, answer in PROMPTS:
        if args.only and name not in args.only.split(","):
            continue
        folder = out / name.replace(" ", "-")
        if args.reuse and (folder / "summary.json").is_file():
            s = reused(folder, adapter, args.transcoders)
            seconds = s["build_seconds"]
        else:
            start = time.perf_counter()
            s = featopt.graph.build(prompt=args.prefix + prompt, target=answer, model=args.model, bos=not args.prefix,
                                    transcoders=args.transcoders, out=str(folder), progress=False, adapter=adapter).summary
            seconds = time.perf_counter() - start
            s["build_seconds"] = seconds
            (folder / "summary.json").write_text(json.dumps(s, indent=1))
        tests = []
        for label, how in interventions(adapter.n_layers, args.top):
            record = featopt.graph.intervene(graph=str(folder), factor=0.0, out=str(folder / label.replace(" ", "-")),
                                             adapter=adapter, **how).record
            row = record["logits"][0]
            agree = {key: a["same_sign"] and a["relative_error"] <= TOLERANCE for key, a in record["agreement"].items()}
            tests.append({"label": label, "zeroed": [f["node_id"] for f in record["features"]],
                          **{k: row[k] for k in ("predicted", "predicted_pruned", "frozen_attention", "frozen_errors", "unfrozen")}, "agrees": agree})
            print(f"  {label}: zeroing {tests[-1]['zeroed']}: predicted {row['predicted']:+.3f}, frozen attention "
                  f"{row['frozen_attention']:+.3f}, errors {row['frozen_errors']:+.3f}, unfrozen {row['unfrozen']:+.3f}",
                  flush=True)
        rows.append({"name": name, "prompt": prompt, "answer": answer, "probability": s["logits"][0]["probability"],
                     "replacement_score": s["replacement_score"], "completeness_score": s["completeness_score"],
                     "features": s["nodes"]["features"], "kept_nodes": s["nodes"]["kept"], "kept_edges": s["edges"]["kept"],
                     "seconds": seconds, "attribution_seconds": s["attribution_seconds"], "top_path": s["top_path"]["words"],
                     "interventions": tests})
        print(f"{name}: {seconds:.0f} s, replacement {s['replacement_score']:.2f}, completeness "
              f"{s['completeness_score']:.2f}", flush=True)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record = {"model": args.model, "transcoders": args.transcoders, "tolerance": TOLERANCE, "peak_rss_gib": peak_gib,
              "prompts": rows, "versions": s["versions"]}
    (out / "graphs.json").write_text(json.dumps(record, indent=1))
    (out / "graphs.md").write_text(markdown(rows, peak_gib))
    print(markdown(rows, peak_gib))


def reused(folder: Path, adapter, transcoders: str) -> dict:
    """The summary of a graph built earlier, its top path recomputed (the rule may have changed)."""
    from featopt.attribution.build import in_words, load_transcoders
    from featopt.attribution.files import load_graph
    from featopt.attribution.pruning import prune

    s = json.loads((folder / "summary.json").read_text())
    graph = load_graph(folder / "graph.safetensors")
    pruned = prune(graph, s["settings"]["node_threshold"], s["settings"]["edge_threshold"])
    by_layer = sorted(load_transcoders(transcoders), key=lambda tc: int(tc.cfg.hook_name.split(".")[1]))
    s["top_path"] = in_words(adapter, by_layer, graph, pruned)[1]
    s.setdefault("build_seconds", s["attribution_seconds"])
    return s


def interventions(n_layers: int, top: int) -> list[tuple[str, dict]]:
    """The three tests of each graph: the feature of largest total effect on the answer (often in the
    last layer, a direct effect), the `top` largest among the first two thirds of the layers
    (effects through later features and attention), and the largest between the first third and
    the last layer (a feature whose effect runs through later layers, not the first layers' large
    activations)."""
    early = 2 * n_layers // 3 - 1
    middle = (n_layers // 3, n_layers - 2)
    return [("top feature", {"top": 1}), (f"top {top} of layers 0-{early}", {"top": top, "layers": f"0-{early}"}),
            (f"top feature of layers {middle[0]}-{middle[1]}", {"top": 1, "layers": f"{middle[0]}-{middle[1]}"})]


def markdown(rows: list[dict], peak_gib: float) -> str:
    head = ("| prompt | answer (p) | replacement | completeness | features / kept nodes / kept edges | time | "
            "zeroed | predicted (pruned graph) | attention + errors frozen | errors frozen | unfrozen | agree |\n|"
            + "---|" * 12 + "\n")
    lines = []
    for r in rows:
        for k, t in enumerate(r["interventions"]):
            agree = "/".join("yes" if t["agrees"][key] else "no" for key in ("frozen_attention", "frozen_errors", "unfrozen"))
            first = (f"| {r['prompt']!r} | {r['answer']!r} ({r['probability']:.2f}) | {r['replacement_score']:.2f} | "
                     f"{r['completeness_score']:.2f} | {r['features']:,} / {r['kept_nodes']:,} / {r['kept_edges']:,} | "
                     f"{r['seconds']:.0f} s") if k == 0 else "| | | | | |"
            lines.append(f"{first} | {t['label']}: {', '.join(t['zeroed'])} | {t['predicted']:+.2f} ({t['predicted_pruned']:+.2f}) | "
                         f"{t['frozen_attention']:+.2f} | {t['frozen_errors']:+.2f} | {t['unfrozen']:+.2f} | {agree} |")
    paths = "\n".join(f"- {r['name']}: {r['top_path']}" for r in rows)
    return head + "\n".join(lines) + f"\n\nPeak resident memory {peak_gib:.1f} GiB.\n\nTop paths:\n\n{paths}\n"


if __name__ == "__main__":
    main()
