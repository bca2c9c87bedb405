"""The SAE trainer's optimizers and their default learning rates per SAE.

- adam: Adam (betas 0.9, 0.999) under a linear warm-up, constant, linear decay to 0 schedule;
  lr `2e-4 / sqrt(d_sae / 2^14)`.
- signum: sparsify's default, `schedulefree.ScheduleFreeWrapper(SignSGD(groups), momentum=0.95)`
  with no schedule; lr `2e-3 / sqrt(d_sae / 2^14)`, 0.4x sparsify's `5e-3`: on SmolLM2 layer 6
  (topk, 2304 latents, k 32) sparsify's rate gives held-out FVU 0.153 at 303k tokens but 0.158
  at 2M (no better with more data), this one 0.186 and 0.121 (benchmarks/README.md).

Schedule-free SGD (Defazio et al., 2024) keeps two points per parameter. In train mode the
parameter holds `y = (1 - beta) z + beta x`, where gradients are taken; a step is
`z <- z - lr * sign(grad at y)` and `x <- (1 - c) x + c z` with `c = lr_max^2 / sum of lr_max^2
over the steps so far` (a plain running mean of the z's at a constant lr); `x` is the point to
evaluate and save. The wrapper stores `z` in its state and recovers `x = (y - (1 - beta) z) / beta`;
`optimizer.eval()` moves the parameters to `x`, `optimizer.train()` back to `y`.
"""

from __future__ import annotations

import math

import torch
from schedulefree import ScheduleFreeWrapper
from torch import Tensor

OPTIMIZERS = ("adam", "signum")
SIGNUM_MOMENTUM = 0.95  # sparsify's
_BASE_LR = {"adam": 2e-4, "signum": 2e-3}  # at 2^14 latents


def default_lr(optimizer: str, d_sae: int) -> float:
    """The default lr of `optimizer` for an SAE of `d_sae` latents: its rate at 2^14 latents
    scaled by `1 / sqrt(d_sae / 2^14)` (sparsify's rule: wider SAEs take smaller steps)."""
    return _BASE_LR[optimizer] / math.sqrt(d_sae / 2**14)


class SignSGD(torch.optim.Optimizer):
    """Steepest descent in the L-infinity norm, `p <- p - lr * sign(grad)` (arXiv:1802.04434, as
    sparsify's `SignSGD`); its momentum comes from the schedule-free wrapper around it."""

    def __init__(self, params, lr: float = 1e-3):
        if not lr > 0:
            raise ValueError(f"SignSGD needs a positive learning rate, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


class ScheduleFree(ScheduleFreeWrapper):
    """schedulefree's wrapper plus the `defaults` Lightning asks of an optimizer, and the
    evaluation point `x` of a parameter read without moving the parameter."""

    @property
    def defaults(self) -> dict:
        return self.base.defaults

    @torch.no_grad()
    def step(self, closure=None):
        """The wrapper's step around a sign step, in four passes per parameter instead of its eight
        (it swaps x and z in and out of `p` with xor so that any base optimizer can step `p`):
        `x = lerp(y, z, 1 - 1/beta)`, `z -= lr sign(grad)`, then the new `x = lerp(x, z, c)` and
        `y = lerp(x, z, 1 - beta)` as one `lerp(x, z, 1 - beta (1 - c))`. The state (`z`, and each
        group's `k`, `lr_max`, `weight_sum`) is the wrapper's, so checkpoints are interchangeable."""
        if not isinstance(self.base, SignSGD) or self.weight_decay_at_y:
            return super().step(closure)
        if not self.train_mode:
            raise RuntimeError("the schedule-free optimizer must be in train mode to step (call .train())")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta = self.momentum
        for group in self.param_groups:
            k, lr = group.get("k", 0), group["lr"] * group.get("d", 1.0)
            lr_max = group["lr_max"] = max(lr, group.get("lr_max", 0))
            weight = ((k + 1) ** self.r) * (lr_max ** self.weight_lr_power)
            group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            c = weight / group["weight_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                z = state["z"]
                p.lerp_(z, 1 - 1 / beta)  # y -> x
                z.add_(p.grad.sign(), alpha=-group["lr"])
                p.lerp_(z, 1 - beta * (1 - c))  # x -> the new x -> the new y
            group["k"] = k + 1
        return loss

    @torch.no_grad()
    def evaluation_point(self, p: Tensor) -> Tensor:
        """`x` for parameter `p`, the same numbers `eval()` would write into `p` (`p` itself in
        eval mode, or before its first step, when `x = y = z`)."""
        z = self.state[p].get("z") if self.train_mode and p in self.state else None
        return p if z is None else torch.lerp(p, z, 1 - 1 / self.momentum)


def evaluation_point(optimizer, p: Tensor) -> Tensor:
    """The value of `p` to evaluate or save: `x` under a schedule-free optimizer, else `p`."""
    return optimizer.evaluation_point(p) if isinstance(optimizer, ScheduleFree) else p


def build(name: str, groups: list[dict], *, total_steps: int, warmup_steps: int, decay_fraction: float) -> dict:
    """The answer to Lightning's `configure_optimizers` for optimizer `name` over param `groups`
    (`[{"params": [...], "lr": lr}]`, one per SAE): the optimizer, with adam's step-wise
    schedule (linear warm-up over `warmup_steps`, constant, linear decay to 0 over the last
    `decay_fraction` of `total_steps`); signum has none (schedule-free needs none)."""
    if name == "signum":
        optimizer = ScheduleFree(SignSGD(groups), momentum=SIGNUM_MOMENTUM)
        optimizer.train()  # steps are taken in train mode (parameters at y)
        return {"optimizer": optimizer}
    if name != "adam":
        raise ValueError(f"unknown optimizer {name!r}: allowed are {', '.join(OPTIMIZERS)}")
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999))
    total = max(1, total_steps)
    decay_start = total - int(total * decay_fraction)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1, total - decay_start))
        return warm * decay

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
