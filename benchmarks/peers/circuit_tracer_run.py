"""Build circuit-tracer's attribution graph of given token ids; save it where featopt can read it; print JSON.

Run with the circuit-tracer environment's Python (benchmarks/README.md, "Attribution graphs against
circuit-tracer"); `benchmarks/bench_graph.py` calls it with featopt's token ids and converted
transcoders:

    benchmarks/.peers/circuit-tracer/bin/python benchmarks/peers/circuit_tracer_run.py \
        --model_dir ~/.cache/featopt/gguf/SmolLM2-135M-Instruct.Q4_1-<hash> \
        --transcoders featopt-runs/bench-graph/ct-transcoders --ids 1,504,3575,282,4649,314 \
        --out featopt-runs/bench-graph/circuit-tracer

How circuit-tracer is driven (0.5.0, its default TransformerLens backend, float32, CPU):

- model: circuit-tracer's `TransformerLensReplacementModel.from_pretrained_and_transcoders` is
  `HookedTransformer.from_pretrained(name, fold_ln=False, center_writing_weights=False,
  center_unembed=False)` followed by `_configure_replacement_model(transcoders)`. TransformerLens
  3.2.1's `from_pretrained` takes only its official model names (a local folder ends in
  "... not found. Valid official model names"), so this runner does its steps by hand with
  TransformerLens' own functions: `get_pretrained_model_config(folder)`, the HF model,
  `get_pretrained_state_dict` (TransformerLens' Llama weight conversion),
  `load_and_process_state_dict` with circuit-tracer's three flags, then circuit-tracer's own
  `_configure_replacement_model`. One correction: TransformerLens' generic Llama config leaves
  `rotary_base` at its default 10000; SmolLM2 has rope_theta 100000, set here from config.json.
- the folder: circuit-tracer pins transformers <= 4.57.3, which cannot read the folder featopt
  wrote with transformers 5 (tokenizer class "TokenizersBackend" does not exist there; the
  transformers-5 `rope_parameters` is ignored, so rope_theta silently becomes 10000). So the
  runner makes a view of it, `<out>/model/`: the same model.safetensors and tokenizer.json as
  symbolic links (identical weights), config.json with `rope_theta` copied out of
  `rope_parameters`, tokenizer_config.json naming PreTrainedTokenizerFast.
- transcoders: circuit-tracer's `load_transcoders(config)` on `<transcoders>/config.yaml`
  (model_kind transcoder_set, one `layer_{i}.safetensors` per layer; bench_graph.py writes them),
  its defaults otherwise (lazy decoder).
- attribution: `attribute(ids, model, max_n_logits, desired_logit_prob, batch_size)`, all active
  features (max_feature_nodes None), no offload. The ids are passed as a tensor: circuit-tracer
  keeps them as they are when the first is a special token (BOS), and always zeroes position 0's
  features and error.

Timed: loading (view, transcoders, model) and `attribute`; peak RSS of this process
(`ru_maxrss`). Saved: `<out>/graph.safetensors` (input_ids, features [n, 3] (layer, position,
latent), activations, logit_ids, logit_probs, adjacency, n_layers in the metadata) and
`<out>/run.json`, whose content is also the last line printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def model_view(model_dir: Path, view: Path) -> tuple[Path, float]:
    """A folder transformers 4.57 reads as featopt's transformers-5 folder is meant (see the module
    docstring), with the weights linked, not copied; also the rope theta."""
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors") or name in ("tokenizer.json", "generation_config.json"):
            (view / name).symlink_to((model_dir / name).resolve())
    config = json.loads((model_dir / "config.json").read_text())
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{model_dir}: rope_type {rope['rope_type']!r}; this runner maps only the default rope")
    config["rope_theta"] = theta
    (view / "config.json").write_text(json.dumps(config, indent=1))
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5's TokenizersBackend is this class in 4.x
    (view / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return view, float(theta)


def load_model(view: Path, theta: float, transcoders, n_ctx: int | None):
    """circuit-tracer's `from_pretrained_and_transcoders`, step by step (module docstring)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel

    cfg = loading.get_pretrained_model_config(str(view), fold_ln=False, device="cpu", dtype=torch.float32, n_ctx=n_ctx)
    cfg.rotary_base = theta  # TransformerLens' LlamaForCausalLM branch does not read rope_theta
    hf_model = AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32)
    state = loading.get_pretrained_state_dict(str(view), cfg, hf_model, dtype=torch.float32)
    del hf_model
    model = TransformerLensReplacementModel(cfg, AutoTokenizer.from_pretrained(view), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    del state
    model.move_model_modules_to_device()
    model._configure_replacement_model(transcoders)
    return model


def load_transcoder_set(folder: Path):
    import yaml

    from circuit_tracer.utils.hf_utils import load_transcoders

    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["transcoders"] = [str((folder / p).resolve()) for p in config["transcoders"]]  # relative to the folder
    return load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32), config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="the Hugging Face folder featopt loads (its converted GGUF)")
    p.add_argument("--transcoders", required=True, help="folder with config.yaml and layer_{i}.safetensors")
    p.add_argument("--ids", required=True, help="the prompt's token ids, comma-separated (BOS first)")
    p.add_argument("--prompt", default=None, help="the prompt's text: only to record how circuit-tracer would tokenize it")
    p.add_argument("--out", required=True, help="folder for graph.safetensors and run.json (the model view too)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_n_logits", type=int, default=10)
    p.add_argument("--desired_logit_prob", type=float, default=0.95)
    p.add_argument("--n_ctx", type=int, default=None, help="TransformerLens' context (default: the config's, as it loads it)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    from circuit_tracer import attribute

    start = time.perf_counter()
    view, theta = model_view(Path(args.model_dir).expanduser(), out / "model")
    transcoders, tc_config = load_transcoder_set(Path(args.transcoders))
    model = load_model(view, theta, transcoders, args.n_ctx)
    load_s = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    ids = torch.tensor([int(t) for t in args.ids.split(",")], dtype=torch.long)
    own = model.ensure_tokenized(args.prompt).tolist() if args.prompt is not None else None
    start = time.perf_counter()
    graph = attribute(ids, model, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
                      batch_size=args.batch_size, verbose=False)
    attribute_s = time.perf_counter() - start

    with torch.no_grad():  # the model's own logits on the ids (a check that the loading is right)
        logits = model(ids[None])[0, -1].float()
    tensors = {
        "input_ids": graph.input_tokens.cpu().long(), "features": graph.active_features.cpu().long(),
        "activations": graph.activation_values.cpu().float(), "logit_ids": graph.logit_token_ids.cpu().long(),
        "logit_probs": graph.logit_probabilities.cpu().float(), "adjacency": graph.adjacency_matrix.cpu().float(),
        "last_logits": logits,
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "graph.safetensors"), metadata={"n_layers": str(model.cfg.n_layers)})
    doc = {
        "library": "circuit-tracer", "version": version("circuit-tracer"), "backend": model.backend,
        "transformer_lens": version("transformer-lens"), "transformers": version("transformers"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_s": load_s, "attribute_s": attribute_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_rss_mb": rss_loaded / 1024,
        "n_ctx": model.cfg.n_ctx, "rotary_base": model.cfg.rotary_base, "ids": ids.tolist(), "own_tokenization": own,
        "n_features": int(len(graph.active_features)), "n_nodes": int(graph.adjacency_matrix.shape[0]),
        "feature_input_hook": tc_config["feature_input_hook"], "feature_output_hook": tc_config["feature_output_hook"],
        "settings": {"batch_size": args.batch_size, "max_n_logits": args.max_n_logits,
                     "desired_logit_prob": args.desired_logit_prob, "max_feature_nodes": None, "offload": None},
    }
    (out / "run.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
