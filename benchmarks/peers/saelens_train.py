"""Train an SAE with sae-lens on given token contexts; save it in sae-lens' format; print JSON.

Run with the sae-lens environment's Python (benchmarks/README.md, "Peer environments"):

    benchmarks/.peers/sae-lens/bin/python benchmarks/peers/saelens_train.py --model_dir DIR \
        --contexts train_contexts.safetensors --tokens 303104 --out featopt-runs/bench-sae/saelens

How sae-lens is driven (its own training runner, `LanguageModelSAETrainingRunner`, unchanged):

- model: `model_class_name="AutoModelForCausalLM"` with `model_name` the local HF folder, so
  sae-lens loads it with transformers' `AutoModelForCausalLM` / `AutoTokenizer` and wraps it in its
  `HookedProxyLM`; hook `model.layers.{L}` (the decoder layer's output = resid_post). sae-lens
  derives `stop_at_layer = L + 1` from that name and stops the forward at the hook (its default).
- data: the contexts as a pre-tokenized in-memory `datasets.Dataset` (`override_dataset`), read in
  the file's order (sae-lens does not shuffle a dataset; it mixes activations in its buffer);
  `seqpos_slice=(skip_first, None)` leaves position 0 of every context out of training.
- SAE (`--architecture`): `topk` is `TopKTrainingSAEConfig(k, d_sae = expansion * d_in)`;
  `batchtopk` `BatchTopKTrainingSAEConfig(k)`; `matryoshka` `MatryoshkaBatchTopKTrainingSAEConfig(k,
  matryoshka_widths = d_sae x --matryoshka)` (sae-lens has no default widths; featopt's default
  prefixes 1/16, 1/4, 1); `jumprelu` `JumpReLUTrainingSAEConfig()` at its defaults (L0
  coefficient 1, bandwidth 0.05, thresholds from 0.01, DeepMind's step loss). The three topk kinds
  take sae-lens' topk defaults otherwise
  (`rescale_acts_by_decoder_norm=True`, `decoder_init_norm=0.1`, b_dec at zero, AuxK coefficient
  1 with a 1000-step dead window); inputs scaled to mean squared norm d_in
  (`normalize_activations="expected_average_only_in"`, as featopt does), estimated on
  `--norm_batches` (4) batches that sae-lens draws from its stream and does not train on (its
  default, 1000 batches, would be 4M tokens of forward), folded into the saved weights at the end.
- optimizer: sae-lens' Adam (0.9, 0.999), lr = featopt's default 2e-4 / sqrt(d_sae / 2^14),
  `lr_warm_up_steps`, constant, then `lr_decay_steps` = the last 20% of the steps decaying
  linearly to 0: featopt's schedule exactly.
- buffer: in this sae-lens version the mixing buffer holds `n_batches_in_buffer * (context
  positions kept)` activations, so its default (20) is smaller than one 4096-token batch at context
  128 and raises; `--buffer_batches` (featopt's 16) x 4096 tokens is used instead.

Timers wrap `ActivationsStore.get_activations` (the model forward and the copy of the activations)
and `SAETrainer.step` (SAE forward, backward, Adam step, schedulers); the wall time is that of
`runner.run()` (everything but loading the model and building the runner), including saving.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import Timers, auto_lr, load_contexts, parse_args, report, steps_for


def _flags(p) -> None:
    p.add_argument("--buffer_batches", type=int, default=16, help="mixing buffer size in 4096-token batches")
    p.add_argument("--norm_batches", type=int, default=4, help="batches for the input-scale estimate")
    p.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "matryoshka", "jumprelu"])
    p.add_argument("--matryoshka", default="0.0625,0.25,1", help="matryoshka prefix widths as fractions of d_sae")


def sae_config(args, d_in: int, d_sae: int):
    """sae-lens' training config for `--architecture`, at its defaults but for k and the widths."""
    import sae_lens

    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", normalize_activations="expected_average_only_in")
    if args.architecture == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(**common)
    if args.architecture == "matryoshka":
        widths = [round(float(f) * d_sae) for f in args.matryoshka.split(",")]
        return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=args.k, matryoshka_widths=widths, **common)
    name = {"topk": "TopKTrainingSAEConfig", "batchtopk": "BatchTopKTrainingSAEConfig"}[args.architecture]
    return getattr(sae_lens, name)(k=args.k, **common)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _flags)
    import logging
    import warnings

    import datasets
    import sae_lens
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer
    from transformers import AutoConfig

    warnings.filterwarnings("ignore")
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    datasets.disable_progress_bars()

    torch.manual_seed(args.seed)
    d_in = AutoConfig.from_pretrained(args.model_dir).hidden_size
    d_sae = args.expansion * d_in
    steps = steps_for(args)
    ids = load_contexts(args.contexts)
    context = ids.shape[1]
    kept = context - args.skip_first
    buffer_batches, norm_batches = args.buffer_batches, args.norm_batches
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    lr = auto_lr(d_sae)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_config(args, d_in, d_sae),
        model_name=str(args.model_dir), model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{args.layer}",
        dataset_path="", is_dataset_tokenized=True, streaming=False, context_size=context, prepend_bos=False,
        seqpos_slice=(args.skip_first, None), training_tokens=steps * args.batch_size,
        train_batch_size_tokens=args.batch_size, n_batches_in_buffer=-(-buffer_batches * args.batch_size // kept),
        n_batches_for_norm_estimate=norm_batches, lr=lr, lr_scheduler_name="constant",
        lr_warm_up_steps=args.warmup_steps, lr_decay_steps=int(steps * args.decay_fraction),
        device="cpu", dtype="float32", seed=args.seed, logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, checkpoint_path=None, output_path=str(out), verbose=False,
    )
    timers = Timers()
    counts = {"tokens": 0, "contexts": 0}
    get_activations, step = ActivationsStore.get_activations, SAETrainer.step

    def timed_activations(self, batch_tokens):
        counts["contexts"] += batch_tokens.shape[0]
        return timers.wrap("forward", get_activations)(self, batch_tokens)

    def timed_step(self, batch):
        counts["tokens"] += batch.shape[0]
        return timers.wrap("sae_step", step)(self, batch)

    ActivationsStore.get_activations, SAETrainer.step = timed_activations, timed_step
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset)
    start = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - start
    saved = sorted(p.name for p in out.iterdir())
    report("sae-lens", sae_lens.__version__, tokens=counts["tokens"], steps=steps, wall_s=wall,
           forward_s=timers.seconds.get("forward", 0.0), sae_step_s=timers.seconds.get("sae_step", 0.0),
           forward_tokens=counts["contexts"] * context, out=out,
           settings={"architecture": args.architecture, "lr": lr, "warmup_steps": args.warmup_steps, "decay_steps": int(steps * args.decay_fraction),
                     "n_batches_in_buffer": cfg.n_batches_in_buffer, "norm_batches": norm_batches,
                     "store_batch_size_prompts": cfg.store_batch_size_prompts, "seqpos_slice": [args.skip_first, None],
                     "hook_name": cfg.hook_name, "files": saved})


if __name__ == "__main__":
    main()
