"""What both peer runners share: the command line, the token contexts, timers and the JSON report.

Imported by `saelens_train.py` and `sparsify_train.py` (each run with its own peer environment's
Python, so nothing here imports featopt). A runner prints one JSON object as the last line of its
standard output; `benchmarks/bench_sae.py` reads it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The shared flags, plus those `extra(parser)` adds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model_dir", required=True, help="the Hugging Face model folder (featopt's converted GGUF)")
    p.add_argument("--contexts", required=True, help="safetensors file holding input_ids [N, T] (long)")
    p.add_argument("--tokens", type=int, required=True, help="training budget; steps = ceil(tokens / batch_size)")
    p.add_argument("--out", required=True, help="folder the SAE is saved into (replaced)")
    p.add_argument("--layer", type=int, default=6, help="decoder layer whose output is trained on (resid_post)")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4096, help="tokens per step")
    p.add_argument("--skip_first", type=int, default=1, help="leading positions of every context left out")
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--decay_fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def auto_lr(d_sae: int) -> float:
    """featopt's and sparsify's default Adam learning rate: 2e-4 at 2^14 latents, / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def steps_for(args) -> int:
    return -(-args.tokens // args.batch_size)


def load_contexts(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    ids = load_file(path)["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be [contexts, tokens], got {tuple(ids.shape)}")
    return ids.long()


def tiled(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` contexts of `ids` repeated end to end (epochs), for budgets beyond the corpus."""
    reps = -(-n // len(ids))
    return ids.repeat(reps, 1)[:n] if reps > 1 else ids


class Timers:
    """Accumulated seconds and calls per name; `wrap(name, fn)` times every call of `fn`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name, time.perf_counter() - start)
        return timed


def report(library: str, version: str, *, tokens: int, steps: int, wall_s: float, forward_s: float, sae_step_s: float,
           forward_tokens: int, out: Path, settings: dict, extra: dict | None = None) -> None:
    doc = {
        "library": library, "version": version, "tokens": int(tokens), "steps": int(steps), "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"), "forward_s": forward_s,
        "sae_step_s": sae_step_s, "other_s": wall_s - forward_s - sae_step_s, "forward_tokens": int(forward_tokens),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "out": str(out), "settings": settings,
        **(extra or {}),
    }
    print(json.dumps(doc), flush=True)
