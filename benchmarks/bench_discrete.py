"""Gradient-guided discrete search on SmolLM2-135M (issue: GCG, EPO, discrete inversion), one run:

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_discrete.py \
        --out featopt-runs/bench-discrete

Layers 0 and 8, the 20 features of `FEATURES` (fixed), block outputs (`resid_post`):

1. N = 1: GCG's token against the exhaustive sweep's optimum over the whole vocabulary (share equal),
   pooled (featopt's default: each forward scores a candidate for all 20 features) and per feature;
2. N = 8, last position: GCG against greedy (featopt's, the document's last-position variant) over
   the same allowed tokens (`ALLOWED`: 256 word tokens), GCG capped at greedy's forward
   evaluations (8 x 256 per feature): share of features where GCG >= greedy, mean ratio;
3. the same problem given to nanoGCG (its own venv, `benchmarks/peers/nanogcg_run.py`) and to
   featopt's GCG at one small equal budget (`PEER_STEPS` x `PEER_WIDTH` candidates per feature):
   share of features where featopt >= nanoGCG, seconds per step (per feature) of each; both run
   single-threaded at the same time, each on one core;
4. EPO over the same allowed tokens: per feature, the best activation among the front's points
   with xent <= greedy's answer's xent, against greedy's activation (share >= 0.8);
5. discrete inversion (`invert --method gcg`, defaults) of `bench_inversion.TEXTS` at layer 0;
6. the exhaustive sweep's throughput against a bare forward, layers 0 and 15 (`sweep_throughput`:
   whole runs alternated, `measure`, and each batch's bare forward timed beside it, `paired`).

Everything is re-measured by plain forwards; results go to `out/bench_discrete.json`, tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("FEATOPT_MODEL_PATH", "../shared/models")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from featopt.models import load_model  # noqa: E402
from featopt.errors import FeatoptError  # noqa: E402
from featopt.models.loading import gguf_cache_folder  # noqa: E402
from featopt.results import versions  # noqa: E402
from featopt.commands.invert import InversionConfig  # noqa: E402
from featopt.commands.invert import invert  # noqa: E402
from featopt.discrete.candidates import prompt_xent  # noqa: E402
from featopt.commands.swaps import EPOConfig  # noqa: E402
from featopt.commands.swaps import epo  # noqa: E402
from featopt.commands.search import ExhaustiveConfig  # noqa: E402
from featopt.commands.search import exhaustive  # noqa: E402
from featopt.commands.swaps import GCGConfig  # noqa: E402
from featopt.commands.swaps import gcg  # noqa: E402
from featopt.commands.search import GreedyConfig  # noqa: E402
from featopt.commands.search import greedy  # noqa: E402

MODEL = "smollm2-135m-instruct"
LAYERS = (0, 8)
FEATURES = [3, 17, 42, 64, 101, 128, 150, 199, 233, 256, 300, 333, 365, 400, 421, 450, 487, 512, 540, 575]
SPEC = "[:, :, [" + ", ".join(map(str, FEATURES)) + "]]"
N_ALLOWED, TOKENS = 256, 8
PEER_STEPS, PEER_WIDTH, PEER_TOPK = 8, 64, 64
N1_STEPS, EPO_STEPS = 24, 8
WORD = re.compile(r"^ ?[A-Za-z]{3,}$")


def allowed_tokens(adapter) -> list[int]:
    """The first N_ALLOWED ids from 1000 up that decode to a word (3+ ASCII letters, optional leading space)."""
    picked = []
    for t in range(1000, adapter.vocab_size):
        if WORD.match(adapter.decode([t])):
            picked.append(t)
            if len(picked) == N_ALLOWED:
                return picked
    raise SystemExit("not enough word tokens in the vocabulary")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def one_token(adapter, layer: int, out: Path) -> dict:
    """GCG pooled (featopt's default: one forward scores a token for all 20 features) and per
    feature (`pool=False`, as nanoGCG searches), against the exhaustive optimum."""
    ex, t_ex = timed(lambda: exhaustive(ExhaustiveConfig(model=MODEL, layer=layer, features=SPEC, out=str(out / f"n1-exh-{layer}"),
                                                         progress=False), adapter).results)
    row = {"layer": layer, "exhaustive_s": t_ex, "vocabulary": adapter.vocab_size}
    for name, pool in (("", True), ("_unpooled", False)):
        gc, t_gc = timed(lambda: gcg(GCGConfig(model=MODEL, layer=layer, features=SPEC, tokens=1, steps=N1_STEPS,
                                               search_width=512, topk=4096, allow="all", pool=pool,
                                               out=str(out / f"n1-gcg{name}-{layer}"), progress=False), adapter).results)
        equal = [g.token_ids == e.token_ids for g, e in zip(gc, ex)]
        row.update({f"share_optimal{name}": sum(equal) / len(equal), f"gcg_s{name}": t_gc,
                    f"forwards_total{name}": sum(g.extra["forward_evaluations"] for g in gc),
                    f"fraction_of_optimum_mean{name}": statistics.fmean(g.activation / e.activation for g, e in zip(gc, ex)
                                                                        if e.activation > 0),
                    f"features{name}": [{"feature": f, "gcg": g.token_ids, "gcg_activation": g.activation,
                                         "optimum": e.token_ids, "optimum_activation": e.activation}
                                        for f, g, e in zip(FEATURES, gc, ex)]})
    return row


def greedy_answers(adapter, layer: int, allowed: list[int], out: Path):
    runs, t = timed(lambda: greedy(GreedyConfig(model=MODEL, layer=layer, features=SPEC, tokens=TOKENS, variant="last",
                                                candidates=",".join(map(str, allowed)), out=str(out / f"greedy-{layer}"),
                                                progress=False), adapter).results)
    xent = prompt_xent(adapter, torch.tensor([r.token_ids for r in runs]))
    return runs, xent.tolist(), t


def eight_tokens(adapter, layer: int, allowed: list[int], greedy_runs, out: Path) -> dict:
    budget = TOKENS * len(allowed)
    row = {"layer": layer, "budget": budget}
    for name, pool in (("", True), ("_unpooled", False)):
        gc, t = timed(lambda: gcg(GCGConfig(model=MODEL, layer=layer, features=SPEC, tokens=TOKENS, steps=10_000,
                                            search_width=64, topk=64, max_evaluations=budget, allow="all", pool=pool,
                                            candidates=",".join(map(str, allowed)), out=str(out / f"n8-gcg{name}-{layer}"),
                                            progress=False), adapter).results)
        ratios = [g.activation / r.activation for g, r in zip(gc, greedy_runs) if r.activation > 0]
        row.update({f"share_at_least_greedy{name}": sum(g.activation >= r.activation for g, r in zip(gc, greedy_runs)) / len(gc),
                    f"mean_ratio{name}": statistics.fmean(ratios), f"gcg_s{name}": t,
                    f"evaluations_max{name}": max(g.extra["forward_evaluations"] for g in gc),
                    f"features{name}": [{"feature": f, "gcg": g.activation, "greedy": r.activation, "gcg_text": g.text,
                                         "greedy_text": r.text, "evaluations": g.extra["forward_evaluations"]}
                                        for f, g, r in zip(FEATURES, gc, greedy_runs)]})
    return row


def peer_init(allowed: list[int]) -> list[int]:
    """One random start of TOKENS allowed ids (seed 0), given to both nanoGCG and featopt."""
    gen = torch.Generator().manual_seed(0)
    return [allowed[int(i)] for i in torch.randint(0, len(allowed), (TOKENS,), generator=gen)]


def start_peer(layer: int, allowed_file: Path, out: Path, init: list[int]) -> subprocess.Popen | None:
    python = Path("benchmarks/.peers/nanogcg/bin/python")
    if not python.exists():
        print("nanoGCG venv missing (benchmarks/README.md, 'nanoGCG'): skipping the peer", file=sys.stderr)
        return None
    model_dir = gguf_cache_folder(next(Path(os.environ["FEATOPT_MODEL_PATH"]).glob("smollm2*/*.gguf")))
    cmd = [str(python), "benchmarks/peers/nanogcg_run.py", "--model_dir", str(model_dir), "--layer", str(layer),
           "--features", ",".join(map(str, FEATURES)), "--tokens", str(TOKENS), "--steps", str(PEER_STEPS),
           "--search_width", str(PEER_WIDTH), "--topk", str(min(PEER_TOPK, N_ALLOWED)), "--allowed", str(allowed_file), "--seed", "0",
           "--init_ids", json.dumps(init), "--threads", "1", "--out", str(out / f"nanogcg-{layer}.json")]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / f"nanogcg-{layer}.log", "w"))


def versus_peer(adapter, layer: int, allowed: list[int], out: Path, peer: subprocess.Popen | None,
                init: list[int]) -> dict:
    # The same start and the same number of scored candidates (featopt never scores a sequence
    # twice, so it takes an extra step where nanoGCG's repeats would have spent the budget).
    # Pooled (featopt's default) runs beside the peer and is timed; per feature runs after it.
    def search(pool: bool, name: str):
        return timed(lambda: gcg(GCGConfig(model=MODEL, layer=layer, features=SPEC, tokens=TOKENS, steps=2 * PEER_STEPS,
                                           max_evaluations=PEER_STEPS * PEER_WIDTH, init="ids:" + ",".join(map(str, init)),
                                           search_width=PEER_WIDTH, topk=min(PEER_TOPK, N_ALLOWED), allow="all", pool=pool,
                                           candidates=",".join(map(str, allowed)), out=str(out / f"peer-gcg{name}-{layer}"),
                                           progress=False), adapter).results)

    gc, t = search(True, "")
    steps = max(g.extra["steps"] for g in gc)
    row = {"layer": layer, "featopt_s": t, "featopt_steps": steps, "featopt_s_per_step_per_feature": t / steps / len(FEATURES),
           "featopt_evaluations": [g.extra["forward_evaluations"] for g in gc], "featopt": [g.activation for g in gc]}
    if peer is not None:
        peer.wait()
    alone, _ = search(False, "_unpooled")
    row.update({"featopt_unpooled": [g.activation for g in alone],
                "featopt_unpooled_evaluations": [g.extra["forward_evaluations"] for g in alone]})
    if peer is None:
        return row
    data = json.loads((out / f"nanogcg-{layer}.json").read_text())
    theirs = [f["activation"] for f in data["features"]]
    row.update({"nanogcg": theirs, "nanogcg_s_per_step_per_feature": statistics.fmean(f["seconds_per_step"] for f in data["features"]),
                "nanogcg_evaluations": data["features"][0]["candidate_evaluations"],
                "nanogcg_version": data["nanogcg_version"]})
    for name, ours in (("", row["featopt"]), ("_unpooled", row["featopt_unpooled"])):
        row[f"share_at_least_nanogcg{name}"] = sum(a >= b for a, b in zip(ours, theirs)) / len(theirs)
        row[f"mean_ratio{name}"] = statistics.fmean(a / b for a, b in zip(ours, theirs) if b > 0)
    row["speedup_per_step"] = row["nanogcg_s_per_step_per_feature"] / row["featopt_s_per_step_per_feature"]
    return row


def fluent(adapter, layer: int, allowed: list[int], greedy_runs, greedy_xent, out: Path) -> dict:
    runs, t = timed(lambda: epo(EPOConfig(model=MODEL, layer=layer, features=SPEC, tokens=TOKENS, steps=EPO_STEPS, search_width=16,
                                          topk=64, lambdas=[0.0, 0.5, 1.0, 2.0], allow="all",
                                          candidates=",".join(map(str, allowed)), out=str(out / f"epo-{layer}"),
                                          progress=False), adapter).results)
    rows = []
    for f, r, g, gx in zip(FEATURES, runs, greedy_runs, greedy_xent):
        readable = [q["activation"] for q in r.extra["front"] if q["xent"] <= gx]
        best = max(readable) if readable else None
        rows.append({"feature": f, "greedy": g.activation, "greedy_xent": gx, "front_best_at_greedy_xent": best,
                     "ratio": best / g.activation if best is not None and g.activation > 0 else None,
                     "most_fluent": min(r.extra["front"], key=lambda q: q["xent"])})
    ok = [x["ratio"] is not None and x["ratio"] >= 0.8 for x in rows]
    return {"layer": layer, "share_at_least_0.8": sum(ok) / len(ok), "epo_s": t, "features": rows}


def inversion(adapter, out: Path, smoke: bool = False) -> dict:
    from bench_inversion import TEXTS

    TEXTS = TEXTS[:2] if smoke else TEXTS
    result, t = timed(lambda: invert(InversionConfig(model=MODEL, layer=0, texts=TEXTS, method="gcg",
                                                     out=str(out / "invert-gcg"), progress=False), adapter))
    return {**result.metrics, "seconds": t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="featopt-runs/bench-discrete")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while nanoGCG runs beside (one core each)")
    parser.add_argument("--threads_after", type=int, default=2, help="torch threads for the parts after the peer's")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: n1,n8,peer,epo,invert,sweep")
    parser.add_argument("--smoke", action="store_true", help="2 features, tiny budgets: checks the plumbing only")
    args = parser.parse_args()
    if args.smoke:
        global FEATURES, SPEC, N_ALLOWED, PEER_STEPS, N1_STEPS, EPO_STEPS
        FEATURES, N_ALLOWED, PEER_STEPS, N1_STEPS, EPO_STEPS = FEATURES[:2], 16, 1, 1, 1
        SPEC = "[:, :, [" + ", ".join(map(str, FEATURES)) + "]]"
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        adapter = load_model(MODEL)
    except FeatoptError as error:
        raise SystemExit(f"{MODEL} is not available ({error}): nothing to benchmark.")
    allowed = allowed_tokens(adapter)
    (out / "allowed.json").write_text(json.dumps(allowed))
    report = {"model": MODEL, "features": FEATURES, "allowed": allowed, "threads": args.threads,
              "threads_after": args.threads_after,
              "versions": versions()}
    if "peer" not in skip:  # nanoGCG and featopt's equal-budget GCG at the same time, one core each
        report["peer"], init = [], peer_init(allowed)
        for layer in LAYERS:
            peer = start_peer(layer, out / "allowed.json", out, init)
            report["peer"].append(versus_peer(adapter, layer, allowed, out, peer, init))
            print(json.dumps({k: v for k, v in report["peer"][-1].items() if not isinstance(v, list)}), flush=True)
    torch.set_num_threads(args.threads_after)
    greedy_by_layer = {}
    for layer in LAYERS:
        if {"n8", "epo"} - skip:
            greedy_by_layer[layer] = greedy_answers(adapter, layer, allowed, out)
    for part, fn in (("n1", lambda l: one_token(adapter, l, out)),
                     ("n8", lambda l: eight_tokens(adapter, l, allowed, greedy_by_layer[l][0], out)),
                     ("epo", lambda l: fluent(adapter, l, allowed, greedy_by_layer[l][0], greedy_by_layer[l][1], out))):
        if part in skip:
            continue
        report[part] = []
        for layer in LAYERS:
            report[part].append(fn(layer))
            print(part, json.dumps({k: v for k, v in report[part][-1].items() if not isinstance(v, list)}), flush=True)
    if "invert" not in skip:
        report["invert"] = inversion(adapter, out, args.smoke)
        print("invert", json.dumps(report["invert"]), flush=True)
    if "sweep" not in skip:
        from sweep_throughput import measure, paired

        report["sweep"] = [measure(adapter, layer) for layer in (0, adapter.n_layers // 2)]
        print("sweep", json.dumps(report["sweep"]), flush=True)
        # Batch by batch (see `paired`): the VM's drift between whole runs swamps a few percent.
        report["sweep_paired"] = [paired(adapter, 0, repeats=4), paired(adapter, adapter.n_layers // 2, repeats=2)]
        print("sweep_paired", json.dumps(report["sweep_paired"]), flush=True)
    (out / "bench_discrete.json").write_text(json.dumps(report, indent=2))
    print(f"written: {out / 'bench_discrete.json'}")


if __name__ == "__main__":
    main()
