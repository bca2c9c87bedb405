"""Transcoders: featopt's against sparsify's `--transcode` on one layer, and a per-layer run's table.

`--compare NAME=PATH ...` evaluates saved transcoders (featopt's SAELens folders, sparsify's
hookpoint folders such as `layers.6.mlp`) with featopt's `evaluate` on the same held-out contexts:
FVU of the MLP output, L0, dead fraction, and CE loss recovered and KL with the MLP replaced by the
transcoder. `--layers RUN` prints the per-layer table of a `sae train --site blocks.0-29.mlp_in
--target_site mlp_out` run from its training.json (metrics on its held-out contexts).

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_transcoders.py \\
        --compare featopt=featopt-runs/bench-transcoders/featopt-topk \\
        --compare sparsify=featopt-runs/bench-transcoders/sparsify/layers.6.mlp
    python benchmarks/bench_transcoders.py --layers featopt-runs/transcoders-smollm2-all
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONTEXT = 128


def compare(specs: list[str], args) -> None:
    from featopt.data import corpus_contexts
    from featopt.dictionaries.evaluate import evaluate
    from featopt.models import load_model
    from featopt.models.sae.attach import attach
    from featopt.models.sae.formats import load_sae

    adapter = load_model(args.model)
    names, saes = [], []
    for spec in specs:
        name, _, path = spec.partition("=")
        sae = load_sae(path)
        attach(adapter, sae, path)  # checks both sites and widths
        names.append(name)
        saes.append(sae)
    held_out = corpus_contexts(adapter.tokenizer, args.corpus, CONTEXT, split="eval")[: args.eval_contexts]
    start = time.perf_counter()
    rows = evaluate(adapter, saes, held_out, skip_first=1)
    print(f"evaluated {len(saes)} transcoders on {len(held_out)} held-out contexts in {time.perf_counter() - start:.1f} s")
    print("| transcoder | reads -> writes | FVU (MLP out) | L0 | dead fraction | CE loss recovered | KL (nats) |")
    print("|---|---|---|---|---|---|---|")
    for name, sae, row in zip(names, saes, rows):
        print(f"| {name} | {sae.cfg.hook_name} -> {sae.cfg.target_hook_name} | {row['fvu']:.3f} | {row['l0']:.1f} | "
              f"{row['dead_fraction']:.3f} | {row['ce_loss_recovered']:.3f} | {row['kl_div']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({n: r for n, r in zip(names, rows)}, indent=2, default=str))


def layers(run: str) -> None:
    doc = json.loads((Path(run) / "training.json").read_text())
    print(f"{len(doc['saes'])} transcoders, {doc['run']['tokens']:,} tokens, one pass")
    print("| layer | FVU (MLP out) | L0 | dead fraction | CE loss recovered | KL (nats) |")
    print("|---|---|---|---|---|---|")
    for entry in doc["saes"]:
        m = entry["metrics"]
        layer = entry["name"].split(".")[1]
        print(f"| {layer} | {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} | {m['ce_loss_recovered']:.3f} | "
              f"{m['kl_div']:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", action="append", default=[], help="NAME=PATH of a saved transcoder")
    p.add_argument("--layers", help="a per-layer run's folder (its training.json)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--eval_contexts", type=int, default=64)
    p.add_argument("--out", default="featopt-runs/bench-transcoders/compare.json")
    args = p.parse_args()
    if args.compare:
        compare(args.compare, args)
    if args.layers:
        layers(args.layers)


if __name__ == "__main__":
    main()
