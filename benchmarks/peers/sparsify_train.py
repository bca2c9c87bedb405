"""Train a topk SAE with sparsify (EleutherAI) on given token contexts; save it in sparsify's format; print JSON.

Run with the sparsify environment's Python (benchmarks/README.md, "Peer environments"):

    benchmarks/.peers/sparsify/bin/python benchmarks/peers/sparsify_train.py --model_dir DIR \
        --contexts train_contexts.safetensors --tokens 303104 --out featopt-runs/bench-sae/sparsify

How sparsify is driven (its `Trainer`, as its command line `python -m sparsify` sets it up):

- model: `AutoModel.from_pretrained(model_dir)` (what sparsify's CLI loads for its default
  `loss_fn="fvu"`: the base model, no LM head), float32; hookpoint `layers.{L}` (the decoder
  layer's output = resid_post). sparsify runs the whole base model every step (its hook trains
  the SAE in the middle of the forward); no later block can change what the SAE at layer L sees,
  so this runner cuts the model after layer L (`--whole_model` keeps every block, as the rows
  measured before 2026-12-06 did: the same SAE, about 4x the forward time on SmolLM2 layer 6).
- data: the contexts as an in-memory `datasets.Dataset` (tiled end to end when the budget needs
  more than one pass), shuffled with seed 42 and cut to `steps * batch` contexts, as the CLI does
  with `--shuffle_seed` and `--max_examples`; `batch_size` is in contexts: batch_tokens / context
  length (32 x 128).
- position 0: sparsify has no option for positions, only `exclude_tokens` (token ids). Its trainer
  masks tokens with `torch.isin(x, exclude_tokens, invert=True)`; this runner gives
  `sparsify.trainer` a `torch` whose `isin` also clears the first `skip_first` positions of that
  [batch, T] mask, so those positions are left out of training, of the b_dec initialisation and of
  the dead-latent token counts exactly as an excluded token would be. So a step trains on
  32 x 127 = 4064 activations.
- SAE: `SaeConfig(expansion_factor, k)`, sparsify's defaults otherwise (unit-norm decoder,
  b_dec set to the first batch's mean, AuxK off: `auxk_alpha=0`).
- optimizer: sparsify's own default unless `--optimizer` says otherwise: signum (schedule-free
  SignSGD, momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14), no schedule). `--optimizer adam` is the
  earlier comparison row: lr 2e-4 / sqrt(d_sae / 2^14) (featopt's formula), `lr_warmup_steps` =
  featopt's 50, then sparsify's linear decay to 0 over all remaining steps
  (`get_linear_schedule_with_warmup`; it has no constant phase). No wandb; one save at the end.

Timers: the base model's `forward` (whole call), the time inside sparsify's hook (from a forward
hook on layer L registered before sparsify's own to a forward pre-hook on layer L + 1: SAE forward
and backward), the optimizer's `step` and `remove_gradient_parallel_to_decoder_directions`. The
SAE step is the hook time plus those two; the model forward is the forward call minus the hook
time. The wall time is that of `Trainer(...)` plus `fit()` (model loading excluded), with saving.
"""

from __future__ import annotations

import os
import shutil
from importlib.metadata import version
import time
import types
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: the eager sparse decoder

from common import Timers, load_contexts, parse_args, report, steps_for, tiled  # noqa: E402


def _flags(p) -> None:
    p.add_argument("--optimizer", default="default", choices=["default", "adam", "signum"],
                   help="sparsify's optimizer (default: its own default, signum)")
    p.add_argument("--whole_model", action="store_true", help="run every block (default: cut after --layer)")
    p.add_argument("--transcode", action="store_true",
                   help="train a transcoder of layer L's MLP (hookpoint layers.L.mlp: its input to its output), "
                        "as sparsify's --transcode does")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _flags)
    import datasets
    import torch
    import sparsify.trainer as sparsify_trainer
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer
    from transformers import AutoModel

    datasets.disable_progress_bars()
    ids = load_contexts(args.contexts)
    context = ids.shape[1]
    batch_contexts = args.batch_size // context
    steps = steps_for(args)
    rows = tiled(ids, max(len(ids), steps * batch_contexts))
    # the CLI: dataset.shuffle(shuffle_seed=42), then select(range(max_examples))
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()}).shuffle(42).with_format("torch")
    dataset = dataset.select(range(steps * batch_contexts))
    model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    if not args.whole_model:  # nothing after layer L reaches the SAE at layer L
        model.layers = model.layers[: args.layer + 1]
        model.config.num_hidden_layers = args.layer + 1

    counts = {"tokens": 0, "contexts": 0}
    skip = args.skip_first

    def isin(elements, test_elements, *a, invert=False, **kw):
        mask = torch.isin(elements, test_elements, *a, invert=invert, **kw)
        if invert and mask.dim() == 2:  # the trainer's token mask [batch, T]
            mask[:, :skip] = False
            counts["tokens"] += int(mask.sum())
            counts["contexts"] += mask.shape[0]
        return mask

    class _Torch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = _Torch("torch")
    proxy.isin = isin
    sparsify_trainer.torch = proxy

    timers = Timers()
    layers = model.layers
    marks = {}

    def before(module, inputs, output):  # registered before sparsify's hook on the same layer: runs first
        marks["t"] = time.perf_counter()

    def after(module, inputs):  # the next layer starts: sparsify's hook is done
        if "t" in marks:
            timers.add("in_hook", time.perf_counter() - marks.pop("t"))

    hooked = layers[args.layer].mlp if args.transcode else layers[args.layer]
    hooked.register_forward_hook(before)
    (layers[args.layer + 1] if args.layer + 1 < len(layers) else model.norm).register_forward_pre_hook(after)
    model.forward = timers.wrap("model_call", model.forward)
    SparseCoder.remove_gradient_parallel_to_decoder_directions = timers.wrap(
        "remove_parallel", SparseCoder.remove_gradient_parallel_to_decoder_directions)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    chosen = {} if args.optimizer == "default" else {"optimizer": args.optimizer}
    if args.optimizer == "adam":
        chosen["lr_warmup_steps"] = args.warmup_steps
    cfg = TrainConfig(
        SaeConfig(expansion_factor=args.expansion, k=args.k, transcode=args.transcode), batch_size=batch_contexts,
        **({"hookpoints": [f"layers.{args.layer}.mlp"]} if args.transcode else {"layers": [args.layer]}),
        log_to_wandb=False, save_dir=str(out.parent), run_name=out.name, save_every=10**9, init_seeds=[args.seed],
        **chosen,
    )
    start = time.perf_counter()
    trainer = Trainer(cfg, dataset, model)
    for opt in trainer.optimizers:
        opt.step = timers.wrap("optimizer_step", opt.step)
    trainer.fit()
    wall = time.perf_counter() - start
    s = timers.seconds
    in_hook = s.get("in_hook", 0.0)
    group = trainer.optimizers[0].param_groups[0]
    lr = group.get("initial_lr", group.get("lr"))
    report("sparsify", version("eai-sparsify"), tokens=counts["tokens"], steps=steps, wall_s=wall,
           forward_s=s.get("model_call", 0.0) - in_hook,
           sae_step_s=in_hook + s.get("optimizer_step", 0.0) + s.get("remove_parallel", 0.0),
           forward_tokens=counts["contexts"] * context, out=out / (f"layers.{args.layer}" + (".mlp" if args.transcode else "")),
           settings={"lr": lr, "warmup_steps": cfg.lr_warmup_steps if cfg.optimizer == "adam" else None,
                     "schedule": "linear warm-up, then linear decay to 0" if cfg.optimizer == "adam" else "schedule-free",
                     "batch_contexts": batch_contexts, "optimizer": cfg.optimizer, "auxk_alpha": cfg.auxk_alpha,
                     "layers_run": len(layers), "transcode": args.transcode,
                     "hookpoints": cfg.hookpoints, "files": sorted(p.name for p in out.iterdir())},
           extra={"timers": s})


if __name__ == "__main__":
    main()
