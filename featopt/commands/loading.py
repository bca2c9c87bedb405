"""Loading the model a command's settings name: the one place that turns `--model`, `--dtype`,
`--bos`, `--untrained`, `--trust_remote_code`, `--device_map`, `--max_memory`, `--device` and `--sae`
into a model view."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from featopt.models import ModelAdapter, Site, dtype_of, load_model
from featopt.runs.handle import ModelHandle


def loader_for(settings) -> Callable[[], ModelAdapter]:
    """A picklable zero-argument loader of the settings' model (what spawned workers call)."""
    return functools.partial(
        load_model, settings.model, untrained=bool(getattr(settings, "untrained", False)),
        seed=int(getattr(settings, "seed", 0)), dtype=dtype_of(getattr(settings, "dtype", "float32")),
        bos=bool(getattr(settings, "bos", False)), trust_remote_code=bool(getattr(settings, "trust_remote_code", False)),
        device_map=getattr(settings, "device_map", None) or None, max_memory=getattr(settings, "max_memory", None) or None)


def device_of(settings, adapter: ModelAdapter | None) -> str:
    """`settings.device` ("auto": a given model's device, else cuda when there is one); rank r of a
    process group on cuda uses cuda:r."""
    device = getattr(settings, "device", "auto")
    if device == "auto":
        device = str(adapter.device) if adapter is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized():
        device = f"cuda:{dist.get_rank() % torch.cuda.device_count()}"
    return device


def load_for(settings, adapter: ModelAdapter | None = None, *, move: bool = True) -> ModelAdapter:
    """The settings' model: `adapter` (a caller's, seen with the settings' `--bos`, which leaves
    the caller's own as it was) or loaded by name; on the settings' device when they name one; seen
    through the settings' `--sae` when they give one."""
    dtype_of(getattr(settings, "dtype", "float32"))  # a bad --dtype fails before any loading
    if adapter is None:
        adapter = loader_for(settings)()
    elif hasattr(settings, "bos"):
        adapter = adapter.with_bos(settings.bos)
    if move and hasattr(settings, "device"):
        adapter = adapter.to(device_of(settings, adapter))
    if getattr(settings, "sae", None):
        from featopt.models.sae.attach import attach_path

        adapter, _ = attach_path(adapter, settings.sae)
    return adapter


def handle_for(settings, adapter: ModelAdapter) -> ModelHandle:
    """A handle that spawned workers rebuild the model from: by name when `adapter` is the model
    the settings name (its feature maps and `--bos` come along), else from its weights."""
    same = adapter.info is not None and adapter.info.name == settings.model
    return ModelHandle(adapter, loader_for(settings) if same else None)


def site_list(adapter: ModelAdapter, settings) -> list[Site]:
    """The sites a command reads: the SAE's own with `--sae` (its latents are the features), else
    every `--site` kind (comma-separated; a full `blocks.L.KIND` stands alone) at every `--layer`."""
    from featopt.specs import parse_sites

    if getattr(settings, "sae", None):
        return list(adapter.feature_sites)
    return parse_sites(adapter, settings.site, settings.layer)


def load_plain(config, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """The config's model (or `adapter`, seen with its `--bos`) without its `--sae` attached: for
    commands that run their SAEs themselves on the model's activations."""
    import dataclasses

    return load_for(dataclasses.replace(config, sae=""), adapter)


def bos_id(adapter: ModelAdapter) -> int | None:
    """The id that starts every corpus context under the run's `--bos` (None without it)."""
    return adapter.bos_token_id() if adapter.bos else None


def check_context(adapter: ModelAdapter, length: int) -> None:
    """One sentence when contexts of `length` tokens do not fit the model's positions."""
    adapter.check_positions(length, f"--context_length {length}", f"give at most {adapter.context_limit}")
