"""Big allocations are sized against the memory that is free before they are made.

On a CPU under Linux the kernel's OOM killer usually ends a process that over-allocates before
PyTorch can raise an out-of-memory error, so catching the error is not enough: the bytes are
estimated first and compared with `MemAvailable` (`/proc/meminfo`), or with
`torch.cuda.mem_get_info` on a GPU. Where a batch exists it is shrunk; otherwise one sentence
names the flag to lower.
"""

from __future__ import annotations

import torch

from featopt.errors import FeatoptError

HEADROOM = 0.8  # use at most this share of what is free: the allocator, Python and the OS need the rest


def available(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new tensors on `device`, or None where unknown (then nothing is limited)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fit_batch(batch: int, item_bytes: int, device: torch.device | str, *, flag: str, fixed: int = 0,
              what: str = "a batch") -> int:
    """The largest batch <= `batch` whose `fixed + batch * item_bytes` bytes fit in what is free on
    `device` (halving, so results that do not depend on the batch stay the same); raises
    :class:`FeatoptError` naming `flag` when not even one item fits."""
    free = available(device)
    if free is None:
        return batch
    budget = free * HEADROOM - fixed
    fitting = batch
    while fitting >= 1 and fitting * item_bytes > budget:
        fitting //= 2
    if fitting < 1:
        raise FeatoptError(f"{what} needs {_gib(fixed + item_bytes)} even at {flag} 1, but only {_gib(free)} is free "
                           f"on {torch.device(device).type}: free memory, or use a smaller model or {flag}.")
    return fitting


def check(nbytes: int, device: torch.device | str, *, flag: str, what: str) -> None:
    """Raise :class:`FeatoptError` (naming `flag`) when `nbytes` would not fit in what is free."""
    free = available(device)
    if free is not None and nbytes > free * HEADROOM:
        raise FeatoptError(f"{what} needs {_gib(nbytes)} but only {_gib(free)} is free on {torch.device(device).type}: "
                           f"lower {flag}.")


def forward_row_bytes(model_config, tokens: int, *, logits: bool = False) -> int:
    """A rough upper bound on the bytes one input row of `tokens` tokens takes in a no-grad forward
    (float32): the residual stream, attention and MLP intermediates of one layer at a time, and the
    `[tokens, vocab]` logits when the output is read."""
    get = lambda *names: next((getattr(model_config, n) for n in names if getattr(model_config, n, None)), 0)  # noqa: E731
    d = get("hidden_size", "n_embd", "d_model")
    mlp = get("intermediate_size", "n_inner") or 4 * d
    heads = get("num_attention_heads", "n_head")
    per_token = 6 * d + 2 * mlp + heads * tokens + (get("vocab_size") if logits else 0)
    return 4 * tokens * per_token
