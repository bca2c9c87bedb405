"""Where a model's parts live when accelerate dispatched it over several devices (`--device_map`).

A dispatched model (loaded with a device map that names more than one device, or the disk) carries
accelerate hooks: each module's hook moves its inputs to the module's *execution device*, and a
module whose weights are offloaded (to the CPU or the disk) keeps them on the meta device outside
its forward, loading them for the forward only. featopt's hooks ride on top of those: inputs go to
the embedding's execution device, a site is read where its layer runs, and weights read directly
(the embedding matrix, the LM head, MLP rows) are loaded on demand by :func:`weight`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from featopt.errors import FeatoptError

#: accelerate's named strategies for `--device_map`.
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))  # SequentialHook holds several


def _device(value) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place `model`'s modules (a device map over several devices or the disk)."""
    return any(_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device, else that of its
    first tensor not on the meta device, else the CPU."""
    for hook in _hooks(module):
        if getattr(hook, "execution_device", None) is not None:
            return _device(hook.execution_device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with every offloaded tensor (its own and its submodules') loaded on its execution
    device for the `with` block, offloaded again after: what accelerate does around a forward."""
    done = []
    try:
        for sub in module.modules():
            for hook in _hooks(sub):
                if getattr(hook, "offload", False):
                    hook.pre_forward(sub)
                    done.append((hook, sub))
        yield module
    finally:
        for hook, sub in reversed(done):
            hook.post_forward(sub, None)


def settle(model: nn.Module) -> None:
    """Offload again what a forward cut short left loaded: a hook that loads a module's weights for
    its forward offloads them after it, which an exception raised inside (featopt's early exit)
    skips. A no-op for the leaf-level hooks transformers attaches, where the early exit never lands
    between loading and offloading."""
    for sub in model.modules():
        for hook in _hooks(sub):
            if getattr(hook, "offload", False) and any(
                    not t.is_meta for t in sub.parameters(recurse=bool(getattr(hook, "place_submodules", False)))):
                hook.post_forward(sub, None)


def weight_of(module: nn.Module, name: str = "weight") -> Tensor:
    """`module`'s tensor `name`, detached, with its values also when accelerate offloaded it (then
    a copy on the execution device that outlives the offload)."""
    tensor = getattr(module, name)
    if not tensor.is_meta:
        return tensor.detach()
    with onloaded(module):
        return getattr(module, name).detach()


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """`--device_map`: a strategy name (:data:`DEVICE_MAP_NAMES`), a JSON file (or inline JSON
    object) mapping module names to devices (`0`, `"cuda:1"`, `"cpu"`, `"disk"`), or None."""
    if value is None or value == "" or isinstance(value, dict):
        return value or None
    text = value.strip()
    if text in DEVICE_MAP_NAMES:
        return text
    allowed = f"{', '.join(DEVICE_MAP_NAMES)}, a JSON file mapping module names to devices, or a JSON object"
    if text.startswith("{"):
        where, raw = "--device_map", text
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FeatoptError(f"--device_map {value!r} is neither a strategy nor a file: allowed are {allowed}.")
        where = f"--device_map file {str(path)!r}"
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FeatoptError(f"{where} cannot be read ({type(e).__name__}): give a JSON file mapping module names "
                               f"to devices.") from e
    try:
        mapping = json.loads(raw)
    except ValueError as e:
        raise FeatoptError(f"{where} is not JSON: give {allowed}.") from e
    if not isinstance(mapping, dict) or not mapping:
        raise FeatoptError(f"{where} is not a JSON object of module names to devices: give e.g. "
                           f'{{"model.layers.0": 0, "lm_head": "cpu"}}.')
    return {str(k): _map_device(where, k, v) for k, v in mapping.items()}


def _map_device(where: str, key, value):
    """A device map's device: a GPU index, `"disk"`, or a torch device name that exists here."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "disk":
        return value
    try:
        device = _device(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None:
        raise FeatoptError(f"{where} puts {key!r} on {value!r}, which is not a device: allowed are a GPU index, "
                           f"cuda:N, cpu, mps or disk.")
    _check_exists(where, device)
    return value


def _check_exists(where: str, device: torch.device) -> None:
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FeatoptError(f"{where} names {device}, but this machine has {torch.cuda.device_count()} GPU(s): use "
                           f"GPU indices below that, cpu or disk.")


def parse_max_memory(value: str | dict | None) -> dict | None:
    """`--max_memory '{"0": "20GiB", "cpu": "60GiB"}'` (accelerate's format: a GPU index, cpu, mps or
    disk, to bytes or a size such as 20GiB) -> `{0: "20GiB", "cpu": "60GiB"}`, keys as accelerate wants them."""
    if value is None or value == "":
        return None
    example = '\'{"0": "20GiB", "cpu": "60GiB"}\''
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise FeatoptError(f"--max_memory {value!r} is not JSON: give device to size, e.g. {example}.") from e
    if not isinstance(value, dict) or not value:
        raise FeatoptError(f"--max_memory must be a JSON object of devices to sizes, e.g. {example}.")
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for key, size in value.items():
        key = int(key) if str(key).strip().isdigit() else str(key).strip()
        if not isinstance(key, int) and key not in ("cpu", "mps", "disk"):
            raise FeatoptError(f"--max_memory names device {key!r}: allowed are GPU indices (\"0\"), cpu, mps and disk.")
        if isinstance(key, int):
            _check_exists("--max_memory", torch.device("cuda", key))
        try:
            ok = not isinstance(size, bool) and convert_file_size_to_int(size) > 0
        except (ValueError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise FeatoptError(f"--max_memory gives {key!r} the size {size!r}: give a positive number of bytes or a "
                               f"size such as \"20GiB\" or \"500MB\".")
        out[key] = size
    return out
