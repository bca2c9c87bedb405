"""Maximize residual-stream neurons with nanoGCG's own GCG loop, one feature after another; write JSON.

Run with the nanoGCG environment's Python (benchmarks/README.md, "nanoGCG (peer for bench_discrete)"):

    benchmarks/.peers/nanogcg/bin/python benchmarks/peers/nanogcg_run.py --model_dir DIR --layer 0 \
        --features 3,17 --tokens 4 --steps 5 --search_width 64 --topk 64 --allowed allowed.json \
        --init_ids '[...]' --out nanogcg.json

The objective: the activation of neuron `f` (of d_model) of the output of decoder layer `L`
(`model.model.layers[L]`, before the final norm; HF's `hidden_states[L + 1]` for L < n - 1) at the
LAST optimized token, with the optimized tokens alone as the input (no chat template, no BOS, no
prefix, no suffix). nanoGCG minimizes a cross-entropy to a target string; `FeatureGCG` keeps all of
nanoGCG 0.3.0's `GCG.run` (its loop, `sample_ids_from_grad`, its buffer, the whole model forward
`self.model(inputs_embeds=...)` with the LM head, its batching) and overrides only:

- `compute_token_gradient`: nanoGCG's one-hot gradient, the same forward, loss = -activation
  (read by a forward hook on `model.model.layers[L]`) instead of the cross-entropy;
- `_compute_candidates_loss_original`: nanoGCG's batched candidate forwards, loss = -activation per
  candidate;
- `init_buffer`: nanoGCG's, fed token ids (`--init_ids`) rather than a string, so the initial
  string is exactly those ids (re-encoding a decoded string need not give them back).

The prompt is exactly the optimized string: the tokenizer's chat template is replaced by one that
emits only the message content and `messages="{optim_str}"`, so nanoGCG's "before" and "after"
parts are empty (checked); nanoGCG still appends its target (" x", one token) after the optimized
tokens, which a causal model cannot let change the activation at the optimized positions. Settings
that would change the budget are off: `filter_ids=False` (no retokenization filter, so every step
evaluates exactly `search_width` candidates), `early_stop=False`, no probe sampling,
`use_prefix_cache=False` (the prefix is empty), `use_mellowmax=False` (unused by the new loss).
Allowed ids: every other id of the embedding matrix goes into nanoGCG's `not_allowed_ids` (its
gradient set to +inf before the top-k, as nanoGCG does for non-ASCII tokens); `--topk` must not
exceed the number of allowed ids, or nanoGCG's top-k would reach disallowed ids.

The model folder may be written by transformers 5.x, which nanoGCG's transformers (<= 4.47.1)
cannot read as it is: the config is read here and fixed in memory (`rope_parameters` ->
`rope_theta` / `rope_scaling`, `dtype` -> `torch_dtype`), the tokenizer is built from
`tokenizer.json` with `PreTrainedTokenizerFast`. Nothing is written next to the model.

Output (`--out`, and the same JSON as the last line of stdout): `runner` ("nanogcg"),
`nanogcg_version`, `transformers_version`, `torch_version`, `threads`, the settings (`layer`,
`tokens`, `steps`, `search_width`, `topk`, `n_replace`, `buffer_size`, `batch_size`, `seed`,
`allowed_count`, `target`) and `features`, one entry per feature, in order:

- `feature`, `token_ids` (the ids of nanoGCG's own best step, i.e. of its `best_string`), `text`,
  `activation` (those ids re-measured by a plain HF forward of the ids alone, last position),
  `search_loss` (nanoGCG's `best_loss` = -activation as the search saw it), `best_step`,
  `init_ids`, `init_activation`;
- `seconds` (wall time of `GCG.run`: initial buffer + all steps), `seconds_per_step` (mean) and
  `median_seconds_per_step` (from one end of step to the next), `init_seconds`, `gc_seconds` (in
  nanoGCG's `gc.collect()` after every candidate batch, part of its loop, kept);
- `candidate_evaluations` (candidate sequences forwarded in the steps: steps x search_width, as
  nothing is filtered; nanoGCG does not deduplicate them), `gradient_evaluations` (one
  forward + backward per step), `init_evaluations` (the initial buffer's forwards);
- `trajectory`: the best activation found so far (the initial string included) after each step;
  `step_activations`: each step's best candidate (nanoGCG moves to it even when it is worse, with
  the default buffer_size 0).

The same seed gives the same run. Errors: one sentence on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # nanoGCG's per-step progress bar

import torch  # noqa: E402

TARGET = " x"  # nanoGCG needs a target string; it comes after the optimized tokens, so it cannot matter
CONTENT_ONLY_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ACTIVE: list = []  # the FeatureGCG now running, for the sampling wrapper


class UsageError(Exception):
    """A bad argument or input: reported as one sentence, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="the Hugging Face model folder (featopt's converted GGUF)")
    p.add_argument("--layer", type=int, required=True, help="0-based decoder layer; its output (resid_post) is read")
    p.add_argument("--features", required=True, help="comma-separated neuron indices of d_model, e.g. 3,17")
    p.add_argument("--tokens", type=int, required=True, help="length of the optimized string in tokens")
    p.add_argument("--steps", type=int, default=250, help="nanoGCG num_steps")
    p.add_argument("--search_width", type=int, default=512, help="candidates per step")
    p.add_argument("--topk", type=int, default=256, help="top-k tokens per position from the gradient")
    p.add_argument("--n_replace", type=int, default=1, help="positions replaced per candidate")
    p.add_argument("--buffer_size", type=int, default=0, help="nanoGCG's attack buffer (0: its default)")
    p.add_argument("--batch_size", type=int, default=None, help="candidates per forward (default: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allowed", required=True, help="JSON file: list of allowed token ids")
    p.add_argument("--init_ids", default=None,
                   help="JSON list of --tokens ids, or a file holding one (default: random allowed ids under --seed)")
    p.add_argument("--out", required=True, help="JSON file written")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- loading
def load_config(model_dir: Path):
    """The model's config, readable by transformers 4.x even when transformers 5.x wrote it."""
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.pop("rope_parameters", None)
    if rope is not None:
        raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" and raw.get("rope_scaling") is None:
            raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in raw:
        raw.setdefault("torch_dtype", raw.pop("dtype"))
    model_type = raw.pop("model_type")
    for key in ("transformers_version", "_model_name_or_path"):
        raw.pop(key, None)
    return AutoConfig.for_model(model_type, **raw)


def load_tokenizer(model_dir: Path):
    from transformers import PreTrainedTokenizerFast

    special = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special)


def load(model_dir: str | Path):
    """(model, tokenizer): float32, eval, gradients off, on the CPU."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir).expanduser()
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise UsageError(f"model folder {model_dir} has no {name}.")
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=load_config(model_dir), torch_dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(model_dir)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden states from its forward output (a tuple in transformers 4.x)."""
    return output[0] if isinstance(output, tuple) else output


def measure(model, layer: int, ids: list[list[int]]) -> torch.Tensor:
    """Plain HF forward of `ids` [batch, tokens] alone: layer `layer`'s output at every neuron of the
    last position, [batch, d_model] (a forward hook on `model.model.layers[layer]`)."""
    seen = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: seen.__setitem__("h", layer_output(out)))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids, dtype=torch.long), use_cache=False)
    finally:
        handle.remove()
    return seen["h"][:, -1, :].float()


# ----------------------------------------------------------------------------- the adapter
def feature_gcg_class():
    """`FeatureGCG`, built on the installed nanoGCG (imported here, so `--help` works without it)."""
    import gc

    import nanogcg.gcg as ngcg
    from nanogcg.gcg import GCG, AttackBuffer

    class StepBuffer(AttackBuffer):
        """nanoGCG's buffer, unchanged, noting the time each `log_buffer` call (once after the
        initial evaluation, then once at the end of every step) is reached."""

        def __init__(self, size: int, marks: list):
            super().__init__(size)
            self.marks = marks

        def log_buffer(self, tokenizer):
            super().log_buffer(tokenizer)
            self.marks.append(time.perf_counter())

    class FeatureGCG(GCG):
        """nanoGCG's GCG with the loss -activation of one neuron at the last optimized token."""

        def __init__(self, model, tokenizer, config, *, layer: int, feature: int, not_allowed_ids, init_ids):
            tokenizer.chat_template = CONTENT_ONLY_TEMPLATE
            super().__init__(model, tokenizer, config)
            self.not_allowed_ids = not_allowed_ids
            self.feature = feature
            self.init_ids = init_ids  # [buffer entries, tokens], long
            self.marks: list[float] = []
            self.steps: list[tuple[float, list[int]]] = []  # (nanoGCG's step loss, that candidate's ids)
            self.candidate_rows = 0  # candidate sequences forwarded, the initial buffer excluded
            self.gc_seconds = 0.0  # in nanoGCG's gc.collect() after every candidate batch
            self._pending = None  # the ids nanoGCG sampled this step
            self._hidden = None
            self._hook = model.model.layers[layer].register_forward_hook(self._read)

        def _read(self, module, args, output):
            self._hidden = layer_output(output)

        def close(self):
            self._hook.remove()

        def _activation(self, input_embeds: torch.Tensor) -> torch.Tensor:
            """The feature at the last optimized token of the forward just run, [batch]. The input is
            before + optimized + after + target; before and after are empty (checked)."""
            if self.before_embeds.shape[1] or self.after_embeds.shape[1]:
                raise RuntimeError("nanoGCG's prompt has tokens besides the optimized ones; the template is wrong.")
            pos = input_embeds.shape[1] - self.target_ids.shape[1] - 1
            return self._hidden[:, pos, self.feature]

        # nanoGCG's compute_token_gradient, its cross-entropy replaced by -activation (the prefix
        # cache branch is gone: use_prefix_cache is off, the prefix is empty).
        def compute_token_gradient(self, optim_ids):
            model = self.model
            embedding_layer = self.embedding_layer
            optim_ids_onehot = torch.nn.functional.one_hot(optim_ids, num_classes=embedding_layer.num_embeddings)
            optim_ids_onehot = optim_ids_onehot.to(model.device, model.dtype)
            optim_ids_onehot.requires_grad_()
            optim_embeds = optim_ids_onehot @ embedding_layer.weight
            input_embeds = torch.cat([self.before_embeds, optim_embeds, self.after_embeds, self.target_embeds], dim=1)
            model(inputs_embeds=input_embeds)
            loss = -self._activation(input_embeds).sum()
            return torch.autograd.grad(outputs=[loss], inputs=[optim_ids_onehot])[0]

        # nanoGCG's _compute_candidates_loss_original, its cross-entropy replaced by -activation.
        def _compute_candidates_loss_original(self, search_batch_size, input_embeds):
            all_loss = []
            for i in range(0, input_embeds.shape[0], search_batch_size):
                with torch.no_grad():
                    input_embeds_batch = input_embeds[i:i + search_batch_size]
                    outputs = self.model(inputs_embeds=input_embeds_batch)
                    all_loss.append(-self._activation(input_embeds_batch).float())
                    self._hidden = None
                    del outputs
                    start = time.perf_counter()
                    gc.collect()
                    torch.cuda.empty_cache()
                    self.gc_seconds += time.perf_counter() - start
            loss = torch.cat(all_loss, dim=0)
            if self._pending is not None:  # a step's candidates (not the initial buffer)
                sampled, self._pending = self._pending, None
                self.candidate_rows += input_embeds.shape[0]
                self.steps.append((loss.min().item(), sampled[loss.argmin()].tolist()))
            return loss

        # nanoGCG's init_buffer for a list of initializations, fed ids instead of strings.
        def init_buffer(self):
            buffer = StepBuffer(self.config.buffer_size, self.marks)
            true_buffer_size = max(1, self.config.buffer_size)
            init_buffer_ids = self.init_ids[:true_buffer_size].to(self.model.device)
            init_buffer_embeds = torch.cat([
                self.before_embeds.repeat(true_buffer_size, 1, 1),
                self.embedding_layer(init_buffer_ids),
                self.after_embeds.repeat(true_buffer_size, 1, 1),
                self.target_embeds.repeat(true_buffer_size, 1, 1),
            ], dim=1)
            init_buffer_losses = ngcg.find_executable_batch_size(self._compute_candidates_loss_original, true_buffer_size)(init_buffer_embeds)
            self.init_losses = init_buffer_losses.tolist()
            for i in range(true_buffer_size):
                buffer.add(init_buffer_losses[i], init_buffer_ids[[i]])
            buffer.log_buffer(self.tokenizer)
            return buffer

    # nanoGCG's run() calls the module's sample_ids_from_grad; this wrapper only notes the ids it
    # returns, so the step's best candidate is known as ids (nanoGCG keeps only decoded strings).
    if not getattr(ngcg.sample_ids_from_grad, "records", False):
        sample = ngcg.sample_ids_from_grad

        def recording_sample_ids_from_grad(*a, **kw):
            ids = sample(*a, **kw)
            if ACTIVE:
                ACTIVE[0]._pending = ids
            return ids

        recording_sample_ids_from_grad.records = True
        ngcg.sample_ids_from_grad = recording_sample_ids_from_grad
    return FeatureGCG


# ----------------------------------------------------------------------------- main
def _json_arg(text: str, what: str):
    text = text.strip()
    try:
        return json.loads(text if text.startswith("[") else Path(text).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} is neither a JSON list nor a file holding one ({type(e).__name__}).") from e


def _id_list(value, what: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise UsageError(f"{what} must be a non-empty JSON list of token ids.")
    bad = [i for i in value if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"{what} holds ids outside the vocabulary 0-{vocab - 1} (e.g. {bad[0]}).")
    return value


def run(args: argparse.Namespace) -> dict:
    import nanogcg
    import transformers
    from nanogcg.gcg import GCGConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("nanogcg").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    model_dir = Path(args.model_dir).expanduser()
    if not model_dir.is_dir():
        raise UsageError(f"model folder {model_dir} does not exist.")
    for name, value, low in (("--tokens", args.tokens, 1), ("--steps", args.steps, 1), ("--search_width", args.search_width, 1),
                             ("--topk", args.topk, 1), ("--n_replace", args.n_replace, 1), ("--buffer_size", args.buffer_size, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}.")
    if args.n_replace > args.tokens:
        raise UsageError(f"--n_replace ({args.n_replace}) cannot exceed --tokens ({args.tokens}).")
    try:
        features = [int(f) for f in args.features.split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"--features must be comma-separated integers, got {args.features!r}.") from None
    if not features:
        raise UsageError("--features names no feature.")
    allowed_raw = _json_arg(args.allowed, "--allowed")

    model, tokenizer = load(model_dir)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= args.layer < n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: the model has decoder layers 0-{n_layers - 1}.")
    bad = [f for f in features if not 0 <= f < d_model]
    if bad:
        raise UsageError(f"feature {bad[0]} is out of range: the layer's output has neurons 0-{d_model - 1}.")
    allowed = sorted(set(_id_list(allowed_raw, "--allowed", vocab)))
    if args.topk > len(allowed):
        raise UsageError(f"--topk ({args.topk}) exceeds the {len(allowed)} allowed ids, so nanoGCG's top-k would reach disallowed ids.")
    mask = torch.ones(vocab, dtype=torch.bool)
    mask[allowed] = False
    not_allowed_ids = mask.nonzero().squeeze(1)

    entries = max(1, args.buffer_size)
    if args.init_ids is not None:
        init = _id_list(_json_arg(args.init_ids, "--init_ids"), "--init_ids", vocab)
        if len(init) != args.tokens:
            raise UsageError(f"--init_ids holds {len(init)} ids, --tokens is {args.tokens}.")
        if set(init) - set(allowed):
            raise UsageError(f"--init_ids holds ids that are not allowed (e.g. {sorted(set(init) - set(allowed))[0]}).")
        first = torch.tensor([init])
    else:
        g = torch.Generator().manual_seed(args.seed)
        first = torch.tensor(allowed)[torch.randint(len(allowed), (1, args.tokens), generator=g)]
    # Further buffer entries (buffer_size > 1): nanoGCG draws them from its INIT_CHARS, which need
    # not be allowed ids; here they are random allowed ids, seeded.
    g = torch.Generator().manual_seed(args.seed + 1)
    extra = torch.tensor(allowed)[torch.randint(len(allowed), (entries - 1, args.tokens), generator=g)]
    init_ids = torch.cat([first, extra]).long()

    config = GCGConfig(
        num_steps=args.steps, search_width=args.search_width, batch_size=args.batch_size, topk=args.topk,
        n_replace=args.n_replace, buffer_size=args.buffer_size, use_mellowmax=False, early_stop=False,
        use_prefix_cache=False, allow_non_ascii=True, filter_ids=False, add_space_before_target=False,
        seed=args.seed, verbosity="ERROR", probe_sampling_config=None,
    )
    FeatureGCG = feature_gcg_class()
    # GCG.run sets this itself when a seed is given; its first call imports much of torch._dynamo
    # (about 2 s), which would otherwise land in the first feature's time.
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = []
    for f in features:
        gcg = FeatureGCG(model, tokenizer, config, layer=args.layer, feature=f, not_allowed_ids=not_allowed_ids, init_ids=init_ids)
        ACTIVE[:] = [gcg]
        start = time.perf_counter()
        try:
            result = gcg.run("{optim_str}", TARGET)
        finally:
            seconds = time.perf_counter() - start
            ACTIVE.clear()
            gcg.close()
        if len(gcg.steps) != len(result.losses) or any(abs(a - b) > 0 for (a, _), b in zip(gcg.steps, result.losses)):
            raise RuntimeError("the recorded steps do not match nanoGCG's losses.")
        best_step = result.losses.index(min(result.losses))  # nanoGCG's own choice of best_string
        best_ids = gcg.steps[best_step][1]
        init_activation = -min(gcg.init_losses)
        step_activations = [-loss for loss in result.losses]
        trajectory, best = [], init_activation
        for a in step_activations:
            best = max(best, a)
            trajectory.append(best)
        step_seconds = [b - a for a, b in zip(gcg.marks, gcg.marks[1:])]
        activation = measure(model, args.layer, [best_ids])[0, f].item()
        results.append({
            "feature": f, "token_ids": best_ids, "text": tokenizer.decode(best_ids), "activation": activation,
            "search_loss": result.best_loss, "best_step": best_step, "init_ids": init_ids[0].tolist(),
            "init_activation": init_activation, "seconds": seconds,
            "seconds_per_step": statistics.fmean(step_seconds) if step_seconds else None,
            "median_seconds_per_step": statistics.median(step_seconds) if step_seconds else None,
            "init_seconds": gcg.marks[0] - start if gcg.marks else None,
            "candidate_evaluations": gcg.candidate_rows, "gradient_evaluations": len(gcg.steps),
            "init_evaluations": entries, "gc_seconds": gcg.gc_seconds, "trajectory": trajectory, "step_activations": step_activations,
        })
        print(f"feature {f}: activation {init_activation:.4g} -> {activation:.4g} in {seconds:.1f} s "
              f"({results[-1]['seconds_per_step'] or 0:.3f} s/step)", file=sys.stderr, flush=True)

    return {
        "runner": "nanogcg", "nanogcg_version": _version("nanogcg"), "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(), "model_dir": str(model_dir),
        "layer": args.layer, "tokens": args.tokens, "steps": args.steps, "search_width": args.search_width,
        "topk": args.topk, "n_replace": args.n_replace, "buffer_size": args.buffer_size, "batch_size": args.batch_size,
        "seed": args.seed, "allowed_count": len(allowed), "target": TARGET, "features": results,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        doc = run(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
