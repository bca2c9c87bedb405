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


def parameter_bytes(model_config, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False) -> int:
    """Bytes of the weights of the causal LM `model_config` describes, in `dtype`: the model built on
    the meta device (no memory, no weights read), its parameters (tied ones once) and buffers counted."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for t in model.parameters()) * size + sum(b.numel() * b.element_size() for b in model.buffers())


def estimate(model_config, dtype: torch.dtype = torch.float32, *, tokens: int = 64, batch: int = 8,
             trust_remote_code: bool = False) -> int:
    """What featopt expects a model to need, in bytes: its weights in `dtype` (:func:`parameter_bytes`)
    plus the working memory of a no-grad forward of `batch` rows of `tokens` tokens that reads the
    logits (:func:`forward_row_bytes`, scaled from float32 to `dtype`). Searches with big batches
    size those themselves (:func:`fit_batch`); this is the floor a model must clear to be useful."""
    size = torch.empty((), dtype=dtype).element_size()
    work = forward_row_bytes(model_config, tokens, logits=True) * batch * size // 4
    return parameter_bytes(model_config, dtype, trust_remote_code=trust_remote_code) + work


def _device_name(device) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def check_model(name: str, model_config, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                device_map: str | dict | None = None, max_memory: dict | None = None,
                trust_remote_code: bool = False) -> None:
    """Raise :class:`FeatoptError` (one sentence) before loading a model that cannot fit, instead of an
    out-of-memory kill after minutes of loading.

    Without `device_map` the :func:`estimate` must fit in what is free on `device` (within
    :data:`HEADROOM`). With a dict device map, in the sum of what is free on its devices (a map
    that uses the disk is not limited). With a strategy (`auto`, ...) accelerate fills each device up to
    `max_memory` and puts the rest on the disk, so only a `max_memory` larger than what is free on
    its device is refused.
    """
    if isinstance(device_map, str):
        for key, size in (max_memory or {}).items():
            if key == "disk":
                continue
            from accelerate.utils import convert_file_size_to_int

            free = available(_device_name(key))
            if free is not None and convert_file_size_to_int(size) > free:
                raise FeatoptError(f"--max_memory gives {key} {size} but only {_gib(free)} is free on "
                                   f"{_device_name(key)}: lower it to at most {_gib(free * HEADROOM)}.")
        return
    if isinstance(device_map, dict):
        devices = list(dict.fromkeys(_device_name(d) for d in device_map.values()))
        if "disk" in devices:
            return
    else:
        devices = [str(torch.device(device))]
    frees = [available(d) for d in devices]
    if any(f is None for f in frees):
        return
    free = sum(frees)
    needed = estimate(model_config, dtype, trust_remote_code=trust_remote_code)
    if needed > free * HEADROOM:
        kind = str(dtype).removeprefix("torch.")
        tries = ("--dtype bfloat16, " if torch.empty((), dtype=dtype).element_size() > 2 else "") + \
            "--device_map auto with --max_memory, or a smaller model"
        raise FeatoptError(f"model {name} needs ~{_gib(needed)} in {kind}, but {_gib(free)} is free on "
                           f"{', '.join(devices)} (featopt leaves {1 - HEADROOM:.0%} of it spare): try {tries}.")
