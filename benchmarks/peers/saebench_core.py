"""Cross-check featopt's core SAE metrics against sae-bench's core eval on one saved SAE (issue 25).

Run with the sae-bench environment's Python, from the repository root (benchmarks/README.md,
"Peer environments"); it runs featopt's side itself, in a subprocess with featopt's `.venv`:

    FEATOPT_MODEL_PATH=../shared/models benchmarks/.peers/sae-bench/bin/python benchmarks/peers/saebench_core.py \
        --sae featopt-runs/sae-smollm2-l6-topk --out featopt-runs/saebench-core

What is compared (the defaults: SmolLM2-135M-Instruct, the topk SAE at `blocks.6.hook_resid_post`):

- tokens: featopt's `corpus_contexts(split="eval", bos=<BOS id>)` of `--corpus`, `--context_length`
  tokens each, BOS (id 1) at position 0, keeping only the first `--contexts` contexts with no
  BOS/EOS/PAD id after position 0 (the corpus' EOS separators between documents would otherwise be
  left out by sae-bench, whose masks go by token id, and kept by featopt, whose go by position).
  Both tools get these exact token ids: featopt's side writes them, sae-bench reads them through a
  stand-in for its `ActivationsStore` (sae-bench draws only `get_batch_tokens(n)` from it).
- model: the same Hugging Face folder (featopt's de-quantized GGUF) wrapped in TransformerLens'
  `HookedTransformer` with no weight processing (what sae-bench's `from_pretrained_no_processing`
  does; TransformerLens refuses a path there, so its `get_pretrained_model_config` and
  `get_pretrained_state_dict`, which take a local folder, build it). The script checks first that
  its logits and hook activation equal the Hugging Face forward's (max |difference| printed).
- sae-bench: `sae_bench.evals.core.main.run_evals` unchanged, every scalar metric on
  (`compute_kl/ce_loss/l2_norms/sparsity_metrics/variance_metrics`, feature densities), with
  `--contexts / --batch` reconstruction batches and as many sparsity/variance batches, so both
  passes see all the contexts. The SAE is the saved folder read by sae-lens' `SAE.load_from_disk`
  and formatted by sae-bench's `load_and_format_sae`.
- featopt: `featopt.dictionaries.evaluate.evaluate(adapter, [sae], contexts, batch_size=--batch,
  skip_first=s)`.
- two position rules: (A) sae-bench as its `multiple_evals` runs it, `ignore_tokens = {pad, eos,
  bos}` and `exclude_special_tokens_from_reconstruction=True`, against featopt's default
  `skip_first=1`; (B) sae-bench with no ignored tokens against `skip_first=0`.

Besides sae-bench's own numbers it recomputes, from the same TransformerLens model and sae-lens
SAE, the quantities that explain each gap (the pooled explained variance, the KL over featopt's
positions, the CE with the ablation leaving position 0 alone): see the notes the script prints.
Writes `<out>/saebench_core.json` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REL_TOL = 1e-4  # float32 means over ~8k tokens in another summation order: ~1e-6 relative expected


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="featopt model name (FEATOPT_MODEL_PATH) or folder")
    p.add_argument("--sae", default="featopt-runs/sae-smollm2-l6-topk", help="the saved SAE folder (SAELens format)")
    p.add_argument("--corpus", default="../shared/data/corpora")
    p.add_argument("--contexts", type=int, default=64, help="contexts evaluated (a multiple of --batch)")
    p.add_argument("--context_length", type=int, default=128, help="tokens per context, the BOS included")
    p.add_argument("--batch", type=int, default=16, help="contexts per forward (sae-bench's batch_size_prompts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both processes")
    p.add_argument("--out", default="featopt-runs/saebench-core")
    p.add_argument("--featopt_python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--featopt_side", action="store_true", help=argparse.SUPPRESS)  # internal: featopt's half
    args = p.parse_args(argv)
    if args.contexts % args.batch:
        p.error("--contexts must be a multiple of --batch (sae-bench counts whole batches)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------- featopt's side
def featopt_side(args) -> None:
    """Run in featopt's venv: write the contexts and featopt's metrics under both position rules."""
    from safetensors.torch import save_file

    from featopt.data import corpus_contexts
    from featopt.dictionaries.evaluate import evaluate
    from featopt.models import load_model
    from featopt.models.loading import gguf_cache_folder
    from featopt.models.sae.attach import attach
    from featopt.models.sae.formats import load_sae

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model)
    source = Path(adapter.info.source)
    model_dir = gguf_cache_folder(source) if source.suffix.lower() == ".gguf" else source
    tok = adapter.tokenizer
    bos = adapter.bos_token_id()
    special = sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, bos) if i is not None})
    every = corpus_contexts(tok, args.corpus, args.context_length, split="eval", bos=bos)
    clean = ~torch.isin(every[:, 1:], torch.tensor(special)).any(1)
    contexts = every[clean][: args.contexts].contiguous()
    if len(contexts) < args.contexts:
        raise SystemExit(f"only {len(contexts)} eval contexts without special tokens; ask for fewer")
    sae = load_sae(args.sae)
    attach(adapter, sae, args.sae)  # validates the site and its width
    rows = {}
    for skip in (1, 0):
        start = time.perf_counter()
        row = evaluate(adapter, [sae], contexts, batch_size=args.batch, skip_first=skip, frequency=False)[0]
        rows[f"skip_first={skip}"] = {**row, "seconds": time.perf_counter() - start}
    save_file({"input_ids": contexts}, str(out / "contexts.safetensors"))
    doc = {"model_dir": str(model_dir), "bos": bos, "special_ids": special, "site": sae.cfg.hook_name,
           "contexts_total": len(every), "contexts_with_special": int((~clean).sum()), "metrics": rows,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "featopt.json").write_text(json.dumps(doc, indent=2))


# ----------------------------------------------------------------------------- sae-bench's side
class FixedTokens:
    """What sae-bench's `run_evals` draws from an `ActivationsStore`: the given contexts in order."""

    def __init__(self, ids: torch.Tensor, batch: int):
        self.ids, self.at = ids, 0
        self.context_size = ids.shape[1]
        self.store_batch_size_prompts = batch

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        if self.at + n > len(self.ids):
            raise RuntimeError("sae-bench asked for more contexts than were given")
        batch = self.ids[self.at: self.at + n]
        self.at += n
        return batch

    def reset_input_dataset(self) -> None:
        self.at = 0


def hooked_transformer(model_dir: str, hf, tok):
    """`HookedTransformer.from_pretrained_no_processing` for a local folder."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    cfg = loading.get_pretrained_model_config(model_dir, hf_cfg=hf.config.to_dict(), device="cpu", dtype=torch.float32)
    state = loading.get_pretrained_state_dict(model_dir, cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, tok, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


@torch.no_grad()
def explain(model, sae, ids: torch.Tensor, batch: int, skip: int, recorded: list[dict]) -> dict:
    """The quantities behind each gap, from sae-bench's model and SAE (float64 sums):

    - `ev_pooled`: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the evaluated positions
      (featopt's FVU); `ev_saebench_formula`: sae-bench's expression rebuilt from the same sums,
      1 - mean ||x - x_hat||^2 / (mean ||x||^2 - (mean over d of mean x_d^2)^2);
    - `kl_sae_no_last` / `kl_zero_no_last`: sae-bench's own per-token KL tensors (recorded from its
      `get_recons_loss`) averaged over positions skip..T-2, the predictions featopt averages over;
    - `ce_zero_keep_first` / `kl_zero_keep_first`: next-token CE, and KL from the clean distribution,
      with positions >= skip zero-ablated and the first ones left alone (featopt's ablation), over
      the predictions made at positions skip..T-2.
    """
    hook, layer = sae.cfg.hook_name, sae.cfg.hook_layer
    sse = sx2 = 0.0
    n = 0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_x2_d = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    nll, preds, kl_keep = 0.0, 0, 0.0

    def zero_after_skip(act, hook=None):
        act = act.clone()
        act[:, skip:] = 0
        return act

    for b in ids.split(batch):
        _, cache = model.run_with_cache(b, names_filter=[hook], stop_at_layer=layer + 1)
        x = cache[hook][:, skip:].reshape(-1, sae.cfg.d_in)
        x_hat = sae.decode(sae.encode(x))
        x, x_hat = x.double(), x_hat.double()
        sse += (x - x_hat).pow(2).sum().item()
        sx2 += x.pow(2).sum().item()
        sum_x += x.sum(0)
        sum_x2_d += x.pow(2).sum(0)
        n += x.shape[0]
        clean = model(b, return_type="logits")[:, skip:-1]
        ablated, loss = model.run_with_hooks(b, return_type="both", loss_per_token=True, fwd_hooks=[(hook, zero_after_skip)])
        nll += loss[:, skip:].double().sum().item()
        preds += loss[:, skip:].numel()
        log_p, log_q = (t.double().log_softmax(-1) for t in (clean, ablated[:, skip:-1]))
        kl_keep += (log_p.exp() * (log_p - log_q)).sum().item()
    total = sx2 - (sum_x.pow(2) / n).sum().item()
    mean_x2_d = sum_x2_d / n
    kl_sae = torch.cat([r["kl_div_with_sae"][:, skip:-1] for r in recorded]).double().mean().item()
    kl_zero = torch.cat([r["kl_div_with_ablation"][:, skip:-1] for r in recorded]).double().mean().item()
    return {
        "ev_pooled": 1 - sse / total,
        "ev_saebench_formula": 1 - (sse / n) / (sx2 / n - mean_x2_d.mean().item() ** 2),
        "mse_pooled": sse / n,
        "kl_sae_no_last": kl_sae, "kl_zero_no_last": kl_zero,
        "ce_zero_keep_first": nll / preds, "kl_zero_keep_first": kl_keep / preds,
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def row(name: str, ours, theirs, note: str = "") -> dict:
    r = {"metric": name, "featopt": ours, "sae_bench": theirs, "note": note}
    if ours is not None and theirs is not None and not (math.isnan(ours) or math.isnan(theirs)):
        r["rel_diff"] = rel(ours, theirs)
        r["agree"] = r["rel_diff"] <= REL_TOL
    return r


def compare(fo: dict, sb: dict, ex: dict, tokens_per_batch: int, skip: int, d_in: int) -> list[dict]:
    m = {k: v for group in sb.values() for k, v in group.items()}
    rows = [
        row("explained_variance (1 - FVU)", fo["explained_variance"], m["explained_variance"],
            "sae-bench's formula differs (see ev rows below)"),
        row("  pooled EV recomputed on sae-bench's activations", fo["explained_variance"], ex["ev_pooled"]),
        row("  sae-bench's EV formula rebuilt from the same sums", ex["ev_saebench_formula"], m["explained_variance"],
            "featopt column: the formula on TL activations"),
        row("mse (sum over d, mean over tokens)", fo["mse"], m["mse"] * tokens_per_batch,
            f"sae-bench's mse x {tokens_per_batch} (it divides by the tokens of a batch, not by d)"),
        row("  sae-bench's mse as reported", fo["mse"] / tokens_per_batch, m["mse"], "featopt column: mse / tokens per batch"),
        row("mse per element", fo["mse_per_element"], m["mse"] * tokens_per_batch / d_in,
            f"sae-bench has none: its mse x {tokens_per_batch} / d_in"),
        row("l0", fo["l0"], m["l0"]),
        row("dead fraction (1 - frac_alive)", fo["dead_fraction"], m["dead_fraction"]),
        row("ce_clean (ce_loss_without_sae)", fo["ce_clean"], m["ce_loss_without_sae"]),
        row("ce_sae (ce_loss_with_sae)", fo["ce_sae"], m["ce_loss_with_sae"]),
        row("ce_zero (ce_loss_with_ablation)", fo["ce_zero"], m["ce_loss_with_ablation"],
            "sae-bench zero-ablates every position, BOS too" if skip else ""),
        row("  CE, ablation leaving the first positions alone (TL)", fo["ce_zero"], ex["ce_zero_keep_first"]),
        row("ce_loss_recovered (ce_loss_score)", fo["ce_loss_recovered"], m["ce_loss_score"],
            "from ce_zero" if skip else ""),
        row("kl_div (kl_div_with_sae)", fo["kl_div"], m["kl_div_with_sae"], "sae-bench also averages the last position"),
        row("  sae-bench's KL over positions skip..T-2", fo["kl_div"], ex["kl_sae_no_last"]),
        row("kl_zero (kl_div_with_ablation)", fo["kl_zero"], m["kl_div_with_ablation"],
            "ablations differ (BOS), and the last position" if skip else "sae-bench also averages the last position"),
        row("  sae-bench's ablation KL over positions skip..T-2", fo["kl_zero"], ex["kl_zero_no_last"],
            "ablations differ (BOS)" if skip else ""),
        row("  KL, ablation leaving the first positions alone (TL)", fo["kl_zero"], ex["kl_zero_keep_first"]),
        row("kl score (kl_zero - kl_div) / kl_zero", (fo["kl_zero"] - fo["kl_div"]) / fo["kl_zero"], m["kl_div_score"],
            "from the two rows above"),
    ]
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'metric':58s} {'featopt':>14s} {'sae-bench':>14s} {'rel diff':>9s}  agree  note"]
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:14.7g}"  # noqa: E731
        d = f"{r['rel_diff']:9.1e}" if "rel_diff" in r else f"{'-':>9s}"
        a = ("yes" if r["agree"] else "NO") if "agree" in r else "-"
        lines.append(f"{r['metric']:58s} {f(r['featopt'])} {f(r['sae_bench'])} {d}  {a:5s}  {r['note']}")
    return "\n".join(lines)


def saebench_side(args) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from importlib.metadata import version

    from safetensors.torch import load_file
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sae_bench.evals.core.main as core
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils import general_utils

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [args.featopt_python, str(Path(__file__).resolve()), "--featopt_side", "--model", args.model, "--sae", args.sae,
           "--corpus", args.corpus, "--contexts", str(args.contexts), "--context_length", str(args.context_length),
           "--batch", str(args.batch), "--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    print("[featopt]", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    featopt_s = time.perf_counter() - start
    fo = json.loads((out / "featopt.json").read_text())
    ids = load_file(str(out / "contexts.safetensors"))["input_ids"].long()
    print(f"[featopt] {featopt_s:.0f} s; {len(ids)} contexts x {ids.shape[1]} tokens (BOS {fo['bos']} first; "
          f"{fo['contexts_with_special']} of {fo['contexts_total']} eval contexts held a special id and were passed over)",
          flush=True)

    # The model, and the check that TransformerLens computes what Hugging Face does.
    hf = AutoModelForCausalLM.from_pretrained(fo["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fo["model_dir"])
    model = hooked_transformer(fo["model_dir"], hf, tok)
    sae = SAE.load_from_disk(args.sae, device="cpu")
    _, sae, _ = general_utils.load_and_format_sae("featopt", sae, "cpu")
    sae.eval()
    hook, layer = sae.cfg.hook_name, sae.cfg.hook_layer
    with torch.no_grad():
        probe = ids[: args.batch]
        ref = hf(probe, output_hidden_states=True)
        logits, cache = model.run_with_cache(probe, names_filter=[hook])
        logit_gap = (ref.logits - logits).abs().max().item()
        act_gap = (ref.hidden_states[layer + 1] - cache[hook]).abs().max().item()
        del ref, logits, cache
    print(f"[TL vs HF] max |logit diff| {logit_gap:.2e}, max |{hook} diff| {act_gap:.2e} on {len(probe)} contexts", flush=True)

    # sae-bench's per-token CE/KL tensors, recorded as its own loop gets them.
    recorded: list[dict] = []
    original = core.get_recons_loss

    def recording(*a, **kw):
        result = original(*a, **kw)
        recorded.append({k: v.detach().clone() for k, v in result.items()})
        return result

    core.get_recons_loss = recording
    batches = args.contexts // args.batch
    special = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    results = {"featopt": fo, "tl_vs_hf": {"max_abs_logit_diff": logit_gap, "max_abs_act_diff": act_gap},
               "versions": {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens", "transformers", "torch")},
               "threads": torch.get_num_threads(), "rel_tol": REL_TOL, "rules": {}}
    rules = {"A": (1, special, True), "B": (0, set(), False)}
    for name, (skip, ignore, exclude) in rules.items():
        recorded.clear()
        cfg = CoreEvalConfig(
            model_name=sae.cfg.model_name, llm_dtype="float32", batch_size_prompts=args.batch,
            n_eval_reconstruction_batches=batches, n_eval_sparsity_variance_batches=batches,
            context_size=ids.shape[1], compute_kl=True, compute_ce_loss=True, compute_l2_norms=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            exclude_special_tokens_from_reconstruction=exclude)
        start = time.perf_counter()
        metrics, features = core.run_evals(sae, FixedTokens(ids, args.batch), model, cfg, ignore_tokens=ignore)
        seconds = time.perf_counter() - start
        density = torch.tensor(features["feature_density"])
        metrics["sparsity"]["dead_fraction"] = (density == 0).double().mean().item()
        ex = explain(model, sae, ids, args.batch, skip, recorded)
        featopt_row = fo["metrics"][f"skip_first={skip}"]
        tokens_per_batch = args.batch * (ids.shape[1] - skip)
        rows = compare(featopt_row, metrics, ex, tokens_per_batch, skip, sae.cfg.d_in)
        label = (f"rule {name}: featopt skip_first={skip} vs sae-bench ignore_tokens="
                 f"{sorted(ignore) if ignore else '{}'}, exclude_special_tokens_from_reconstruction={exclude}")
        print(f"\n{label} ({seconds:.0f} s sae-bench, {featopt_row['tokens']} featopt tokens)\n{table(rows)}", flush=True)
        results["rules"][name] = {"label": label, "saebench": metrics, "explain": ex, "rows": rows, "saebench_s": seconds}
    core.get_recons_loss = original
    (out / "saebench_core.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out / 'saebench_core.json'}")


if __name__ == "__main__":
    parsed = parse_args()
    featopt_side(parsed) if parsed.featopt_side else saebench_side(parsed)
