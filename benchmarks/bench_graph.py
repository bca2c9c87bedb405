"""Attribution graphs: featopt's `build_graph` against circuit-tracer's `attribute` (issue 26).

Same model file, same token ids, same transcoders, same logit rule (at most `--max_logits` logits
until `--desired_prob`), same batch size:

- transcoders: featopt's folder (`load_transcoders`) is converted into circuit-tracer's format in
  `<out>/ct-transcoders/`: `layer_{i}.safetensors` with `W_enc [d_sae, d_model]` (sae-lens'
  transposed), `W_dec`, `b_enc` (with any `b_dec` input centring folded in, which circuit-tracer
  does not do), `b_dec`, `activation_function.threshold` (clamped at 0: featopt's jumprelu is
  `relu(pre) * (pre > t)`, circuit-tracer's `pre * (pre > t)`), `W_skip` when there is one; and
  `config.yaml` reading `mlp.hook_in` and writing `mlp.hook_out`, the hooks circuit-tracer's
  TransformerLens model puts around each MLP: featopt's `blocks.L.mlp_in` is the post-attention
  norm's output *with* its weight, which TransformerLens' `ln2.hook_normalized` (the name
  featopt's cfg.json gives) is not (`--input_hook` to try another);
- tokens: featopt's with `--bos` (BOS first), handed to circuit-tracer as ids, which it keeps
  as they are (it prepends a BOS itself only when the first token is not special);
- position 0: circuit-tracer zeroes the features and the error of position 0 (the BOS);
  featopt's `build_graph(skip_first=1)` does the same (`--skip_first 0` keeps them, as featopt
  did before: then they are left out of the comparison and their share of featopt's edge weight
  is reported).

Each library runs in its own process (featopt: this script with `--worker`; circuit-tracer:
`peers/circuit_tracer_run.py` in `benchmarks/.peers/circuit-tracer`), timed inside (loading;
attribution: featopt's `attribute` inside `build_graph`, which also prunes and writes files;
circuit-tracer's `attribute`) and measured from outside the same way: wall time and peak RSS of
the process (`os.wait4`'s `ru_maxrss`). Edges are compared on the nodes both graphs have, mapped
by (layer, position, latent), (layer, position), position and token id.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_graph.py \\
        --out featopt-runs/bench-graph
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "benchmarks" / ".peers" / "circuit-tracer" / "bin" / "python"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- conversion
def convert_transcoders(transcoders, out: Path, model_name: str, input_hook: str, output_hook: str) -> Path:
    """featopt's transcoders (by layer) in circuit-tracer's per-layer format (module docstring)."""
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for layer, tc in enumerate(transcoders):
        if not hasattr(tc, "threshold") and tc.cfg.architecture != "relu":
            raise SystemExit(f"layer {layer}: a {tc.cfg.architecture} transcoder has no circuit-tracer activation "
                             "(it has relu and jumprelu)")
        tensors = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.training_bias(), "b_dec": tc.b_dec}
        if hasattr(tc, "threshold"):
            tensors["activation_function.threshold"] = tc.threshold.clamp_min(0)
        if tc.cfg.skip:
            tensors["W_skip"] = tc.W_skip  # [d_out, d_in]: both libraries compute x @ W_skip.T
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / f"layer_{layer}.safetensors"))
        files.append(f"layer_{layer}.safetensors")
    config = {"model_kind": "transcoder_set", "model_name": model_name, "scan": f"featopt/{out.name}",
              "feature_input_hook": input_hook, "feature_output_hook": output_hook, "transcoders": files}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# ----------------------------------------------------------------------------- the two runs
def worker(args) -> None:
    """featopt's side, in its own process: load, `build_graph`, the model's own last logits."""
    from safetensors.torch import save_file

    from featopt.attribution import build
    from featopt.models import load_model
    from featopt.models.loading import gguf_cache_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    adapter = load_model(args.model, bos=True)  # circuit-tracer always runs a BOS first
    transcoders = build.load_transcoders(args.transcoders)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    # circuit-tracer zeroes position 0's features and error; featopt's build_graph does the same with
    # skip_first=1 (its default since issue 26; older checkouts have no such argument and keep them)
    skip = {"skip_first": args.skip_first} if "skip_first" in inspect.signature(build.build_graph).parameters else {}
    summary = build.build_graph(adapter, transcoders, args.prompt, args.out / "featopt", max_logits=args.max_logits,
                                desired_prob=args.desired_prob, batch_size=args.batch_size, **skip)
    build_s = time.perf_counter() - start
    ids = adapter.encode(args.prompt)
    with torch.no_grad():
        logits = adapter.model(input_ids=ids[None]).logits[0, -1].float()
    save_file({"last_logits": logits}, str(args.out / "featopt" / "last_logits.safetensors"))
    source = adapter.info.source
    model_dir = gguf_cache_folder(Path(source)) if source.endswith(".gguf") else Path(source)
    print(json.dumps({"library": "featopt", "load_s": load_s, "attribute_s": summary["attribution_seconds"],
                      "build_s": build_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ids": ids.tolist(), "model_dir": str(model_dir), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "skip_first": skip.get("skip_first", 0)}), flush=True)


def run_measured(name: str, cmd: list[str], out: Path) -> dict:
    """Run `cmd`; its last JSON line, with the process' wall time and peak RSS (`wait4`)."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **OFFLINE})
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the sum of all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}); log {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    row = json.loads(lines[-1])
    row.update(process_wall_s=wall, process_peak_rss_mb=usage.ru_maxrss / 1024, command=" ".join(cmd))
    (out / f"{name}.row.json").write_text(json.dumps(row, indent=1))
    return row


# ----------------------------------------------------------------------------- comparison
def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Edge agreement of two equally indexed weight sets: max |a - b|, the largest relative
    difference over edges above 1e-3 of the largest weight, the correlation over edges either has."""
    a, b = a.double().flatten(), b.double().flatten()
    nz = (a != 0) | (b != 0)
    if not nz.any():
        return {"edges": 0, "max_abs": 0.0, "max_rel": 0.0, "corr": float("nan"), "max_w": 0.0}
    a, b = a[nz], b[nz]
    big = torch.maximum(a.abs(), b.abs())
    top = float(big.max())
    keep = big > 1e-3 * top
    rel = float(((a - b).abs()[keep] / big[keep]).max()) if keep.any() else 0.0
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(a) > 1 else float("nan")
    return {"edges": int(nz.sum()), "max_abs": float((a - b).abs().max()), "max_rel": rel, "corr": corr, "max_w": top}


def compare(out: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from featopt.attribution.files import load_graph

    F = load_graph(out / "featopt" / "graph.safetensors")
    C = load_file(str(out / "circuit-tracer" / "graph.safetensors"))
    with safe_open(str(out / "circuit-tracer" / "graph.safetensors"), "pt") as f:
        assert int(f.metadata()["n_layers"]) == F.n_layers
    L, T = F.n_layers, F.n_pos
    res = {"tokens_equal": F.input_ids.tolist() == C["input_ids"].tolist(), "tokens": F.input_ids.tolist()}
    f_feat = {tuple(k): i for i, k in enumerate(F.features.tolist())}
    c_feat = {tuple(k): i for i, k in enumerate(C["features"].tolist())}
    f_later = {k for k in f_feat if k[1] > 0}  # circuit-tracer zeroes position 0
    common = sorted(f_later & c_feat.keys())
    only_f, only_c = sorted(f_later - c_feat.keys()), sorted(c_feat.keys() - f_feat.keys())
    fa, ca = F.activations[[f_feat[k] for k in common]], C["activations"][[c_feat[k] for k in common]]
    res["features"] = {"featopt": len(f_feat), "featopt_pos0": len(f_feat) - len(f_later), "circuit_tracer": len(c_feat),
                       "common": len(common), "only_featopt": only_f[:10], "only_circuit_tracer": only_c[:10],
                       "n_only_featopt": len(only_f), "n_only_circuit_tracer": len(only_c),
                       "set_equal": not only_f and not only_c,
                       "activation_max_abs": float((fa - ca).abs().max()) if common else 0.0,
                       "activation_max_rel": float(((fa - ca).abs() / ca.abs()).max()) if common else 0.0}
    f_logits, c_logits = F.logit_ids.tolist(), C["logit_ids"].tolist()
    shared_logits = [t for t in f_logits if t in c_logits]
    res["logits"] = {"featopt": f_logits, "circuit_tracer": c_logits, "equal": f_logits == c_logits,
                     "prob_max_abs": max((abs(float(F.logit_probs[f_logits.index(t)] - C["logit_probs"][c_logits.index(t)]))
                                          for t in shared_logits), default=0.0)}
    own_f = load_file(str(out / "featopt" / "last_logits.safetensors"))["last_logits"]
    res["model_logits_max_abs"] = float((own_f - C["last_logits"]).abs().max())

    # node maps: index in featopt's graph and in circuit-tracer's, kind by kind
    fr, cr = F.node_ranges(), {"features": (0, len(c_feat))}
    cr["errors"] = (cr["features"][1], cr["features"][1] + L * T)
    cr["tokens"] = (cr["errors"][1], cr["errors"][1] + T)
    cr["logits"] = (cr["tokens"][1], cr["tokens"][1] + len(c_logits))
    assert C["adjacency"].shape[0] == cr["logits"][1]
    errs = [layer * T + pos for layer in range(L) for pos in range(1, T)]
    maps = {"features": ([f_feat[k] for k in common], [c_feat[k] for k in common]),
            "errors": ([fr["errors"][0] + e for e in errs], [cr["errors"][0] + e for e in errs]),
            "tokens": (list(range(*fr["tokens"])), list(range(*cr["tokens"]))),
            "logits": ([fr["logits"][0] + f_logits.index(t) for t in shared_logits],
                       [cr["logits"][0] + c_logits.index(t) for t in shared_logits])}
    fi = torch.tensor([i for kind in maps for i in maps[kind][0]])
    ci = torch.tensor([i for kind in maps for i in maps[kind][1]])
    A_f, A_c = F.adjacency, C["adjacency"]
    rows_f = torch.tensor(maps["features"][0] + maps["logits"][0])  # the rows that have inputs
    rows_c = torch.tensor(maps["features"][1] + maps["logits"][1])
    res["edges"] = {"all": agreement(A_f[fi][:, fi], A_c[ci][:, ci])}
    for kind in ("features", "errors", "tokens"):
        cols_f, cols_c = torch.tensor(maps[kind][0], dtype=torch.long), torch.tensor(maps[kind][1], dtype=torch.long)
        res["edges"][f"from {kind}"] = agreement(A_f[rows_f][:, cols_f], A_c[rows_c][:, cols_c])
    res["edges"]["into logits"] = agreement(A_f[torch.tensor(maps["logits"][0])][:, fi], A_c[torch.tensor(maps["logits"][1])][:, ci])
    # what the comparison leaves out: featopt's position-0 nodes (its inputs to the shared rows)
    pos0 = [f_feat[k] for k in f_feat if k[1] == 0] + [fr["errors"][0] + layer * T for layer in range(L)]
    total = float(A_f[rows_f].abs().sum())
    res["featopt_pos0_share"] = float(A_f[rows_f][:, torch.tensor(pos0)].abs().sum()) / total if total else 0.0
    res["ct_pos0_error_max"] = float(A_c[:, [cr["errors"][0] + layer * T for layer in range(L)]].abs().max())
    res["nodes"] = {"featopt": int(A_f.shape[0]), "circuit_tracer": int(A_c.shape[0]), "compared": len(fi)}
    return res


# ----------------------------------------------------------------------------- report
def table(fo: dict, ct: dict, res: dict) -> str:
    feats = res["features"]
    rows = [
        ("tokens (BOS first)", str(res["tokens"]), "same" if res["tokens_equal"] else "DIFFERENT"),
        ("active features", f"{feats['featopt']} ({feats['featopt_pos0']} at position 0)",
         f"{feats['circuit_tracer']} (position 0 zeroed)"),
        ("features at positions >= 1", f"{feats['featopt'] - feats['featopt_pos0']}",
         f"{feats['circuit_tracer']}: " + ("the same set" if feats["set_equal"] else f"{feats['common']} shared")),
        ("nodes", str(res["nodes"]["featopt"]), str(res["nodes"]["circuit_tracer"])),
        ("logit ids", str(res["logits"]["featopt"]), "same" if res["logits"]["equal"] else str(res["logits"]["circuit_tracer"])),
        ("load s (model + transcoders)", f"{fo['load_s']:.1f}", f"{ct['load_s']:.1f}"),
        ("attribution s", f"{fo['attribute_s']:.1f} (build_graph {fo['build_s']:.1f})", f"{ct['attribute_s']:.1f}"),
        ("process wall s", f"{fo['process_wall_s']:.1f}", f"{ct['process_wall_s']:.1f}"),
        ("peak RSS MB", f"{fo['process_peak_rss_mb']:.0f}", f"{ct['process_peak_rss_mb']:.0f}"),
    ]
    lines = ["| | featopt | circuit-tracer |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| edges (shared nodes) | edges | max abs diff | max rel diff (>1e-3 max) | correlation | max weight |",
              "|---|---|---|---|---|---|"]
    for name, e in res["edges"].items():
        lines.append(f"| {name} | {e['edges']} | {e['max_abs']:.2e} | {e['max_rel']:.2e} | {e['corr']:.7f} | {e['max_w']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--transcoders", type=Path, default=ROOT / "featopt-runs" / "transcoders-smollm2-all-v2")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--out", type=Path, default=ROOT / "featopt-runs" / "bench-graph")
    p.add_argument("--batch_size", type=int, default=32, help="targets per backward pass, both libraries")
    p.add_argument("--max_logits", type=int, default=10)
    p.add_argument("--desired_prob", type=float, default=0.95)
    p.add_argument("--input_hook", default="mlp.hook_in", help="circuit-tracer's feature_input_hook")
    p.add_argument("--output_hook", default="mlp.hook_out", help="circuit-tracer's feature_output_hook")
    p.add_argument("--n_ctx", type=int, default=None, help="circuit-tracer's TransformerLens context (default: the config's)")
    p.add_argument("--skip_first", type=int, default=1, help="featopt's build_graph skip_first (circuit-tracer: always 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both processes (default: torch's)")
    p.add_argument("--resume", action="store_true", help="reuse <out>/*.row.json and the graphs written earlier")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    if not PEER.exists():
        raise SystemExit(f"{PEER} is missing: make the peer environment first (benchmarks/README.md).")

    from featopt.attribution.build import load_transcoders

    tcs = sorted(load_transcoders(args.transcoders), key=lambda tc: int(tc.cfg.hook_name.split(".")[1]))
    ct_dir = convert_transcoders(tcs, args.out / "ct-transcoders", args.model, args.input_hook, args.output_hook)
    del tcs
    common = ["--batch_size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    rows = {}
    for name in ("featopt", "circuit-tracer"):
        row_file = args.out / f"{name}.row.json"
        if args.resume and row_file.exists():
            rows[name] = json.loads(row_file.read_text())
            continue
        if name == "featopt":
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--transcoders", str(args.transcoders),
                   "--prompt", args.prompt, "--out", str(args.out), "--max_logits", str(args.max_logits),
                   "--desired_prob", str(args.desired_prob), "--skip_first", str(args.skip_first), *common]
        else:
            fo = rows["featopt"]
            cmd = [str(PEER), str(ROOT / "benchmarks" / "peers" / "circuit_tracer_run.py"), "--model_dir", fo["model_dir"],
                   "--transcoders", str(ct_dir), "--ids", ",".join(map(str, fo["ids"])), "--prompt", args.prompt,
                   "--out", str(args.out / "circuit-tracer"), "--max_n_logits", str(args.max_logits),
                   "--desired_logit_prob", str(args.desired_prob), *common]
            cmd += ["--n_ctx", str(args.n_ctx)] if args.n_ctx else []
        rows[name] = run_measured(name, cmd, args.out)
    res = compare(args.out)
    res["runs"] = rows
    (args.out / "comparison.json").write_text(json.dumps(res, indent=1))
    ct = rows["circuit-tracer"]
    print(f"\ncircuit-tracer {ct['version']} ({ct['backend']} backend, transformer-lens {ct['transformer_lens']}, "
          f"transformers {ct['transformers']}), hooks {ct['feature_input_hook']} -> {ct['feature_output_hook']}; "
          f"torch {rows['featopt']['torch']}, {rows['featopt']['threads']} threads; circuit-tracer's own tokenization "
          f"{'matches' if ct['own_tokenization'] == res['tokens'] else 'differs: ' + str(ct['own_tokenization'])}")
    print(f"model's last logits, HF (featopt) vs TransformerLens (circuit-tracer): max abs diff {res['model_logits_max_abs']:.2e}; "
          f"common features' activations: max abs diff {res['features']['activation_max_abs']:.2e}, "
          f"rel {res['features']['activation_max_rel']:.2e}; logit probabilities: max abs diff {res['logits']['prob_max_abs']:.2e}")
    print(f"left out: featopt's position-0 nodes carry {res['featopt_pos0_share']:.2%} of its edge weight into shared "
          f"targets; circuit-tracer's position-0 error columns are at most {res['ct_pos0_error_max']:.1e}")
    if not res["features"]["set_equal"]:
        print(f"features only in featopt: {res['features']['only_featopt']}; only in circuit-tracer: "
              f"{res['features']['only_circuit_tracer']}")
    print("\n" + table(rows["featopt"], ct, res))


if __name__ == "__main__":
    main()
