"""A model made linear around one input: attention patterns and normalisation scales frozen at their
values on it (Circuit Tracing's local replacement model; `featopt/attribution` builds on it).

:func:`capture_frozen` runs the model once on an input, in eager attention (the only kind that hands
out its pattern), and records each attention layer's pattern `[heads, T, T]` and each RMSNorm's
scale `1 / sqrt(mean(x^2) + eps)` `[T, 1]`. Inside :func:`frozen`, forwards of the same positions
(any batch) use them: a norm multiplies its input by the frozen scale and its weight, an attention
layer returns `o_proj(pattern @ v_proj(x))` (grouped-query heads sharing values), so the output is
linear in the residual stream and equals the model's own at the captured input.

Llama-like models only (llama, mistral, qwen2, qwen3: RMSNorm, separate `v_proj`/`o_proj`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from featopt.errors import FeatoptError
from featopt.models.sites import Site

LINEARIZABLE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Frozen:
    """What a forward on one input fixes: `patterns` per layer `[heads, T, T]`, `scales` per norm
    module (by id) `[T, 1]`, and the model's own `logits [T, vocab]` (float32)."""

    patterns: list[Tensor]
    scales: dict[int, Tensor]
    logits: Tensor


def check_linearizable(adapter) -> None:
    model_type = adapter.model.config.model_type
    if model_type not in LINEARIZABLE:
        raise FeatoptError(f"attribution graphs need a Llama-like model ({', '.join(LINEARIZABLE)}); "
                           f"{adapter.name} is a {model_type!r} model.")


def _norms(adapter) -> list[nn.Module]:
    """The RMSNorm modules of the model (they hold `variance_epsilon` and a `weight`)."""
    return [m for m in adapter.base.modules() if hasattr(m, "variance_epsilon") and isinstance(getattr(m, "weight", None), Tensor)]


@contextlib.contextmanager
def _forward_hooks(specs) -> Iterator[None]:
    """Forward hooks `(module, fn, with_kwargs)`, always removed."""
    handles = []
    try:
        for module, fn, with_kwargs in specs:
            handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eager(model) -> Iterator[None]:
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@torch.no_grad()
def capture_frozen(adapter, input_ids: Tensor, read: Iterable[Site] = ()) -> tuple[Frozen, dict[Site, Tensor]]:
    """Run `input_ids [T]` once as the model is; `(what it fixes, the `read` sites' activations
    [T, width] in float32)`."""
    check_linearizable(adapter)
    patterns: list[Tensor | None] = [None] * adapter.n_layers
    scales: dict[int, Tensor] = {}

    def on_norm(module, args, output):
        x = args[0].float()
        scales[id(module)] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)[0]

    def on_attn(layer):
        def hook(module, args, output):
            patterns[layer] = output[1][0].float()
        return hook

    specs = [(n, on_norm, False) for n in _norms(adapter)]
    specs += [(block.self_attn, on_attn(i), False) for i, block in enumerate(adapter.blocks)]
    with _eager(adapter.model), _forward_hooks(specs), adapter.hooks(read=list(read)) as captured:
        logits = adapter.model(input_ids=input_ids.to(adapter.device).reshape(1, -1)).logits[0].float()
    return Frozen(patterns, scales, logits), {site: act[0].float() for site, act in captured.items()}


@contextlib.contextmanager
def frozen(adapter, state: Frozen, on_final_norm=None) -> Iterator[None]:
    """Forwards inside the block use `state`'s patterns and scales (see the module docstring);
    `on_final_norm(output)` sees the final norm's output `[B, T, d_model]`."""
    check_linearizable(adapter)
    config = adapter.model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads

    def on_norm(module, args, output):
        x = args[0]
        y = module.weight * (x.float() * state.scales[id(module)]).to(x.dtype)
        if module is adapter.final_norm and on_final_norm is not None:
            on_final_norm(y)
        return y

    def on_attn(layer):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, t, _ = x.shape
            v = module.v_proj(x).view(b, t, n_kv, -1).transpose(1, 2).repeat_interleave(n_heads // n_kv, dim=1)
            mixed = (state.patterns[layer].to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1)
            return (module.o_proj(mixed), None)
        return hook

    specs = [(n, on_norm, False) for n in _norms(adapter)]
    specs += [(block.self_attn, on_attn(i), True) for i, block in enumerate(adapter.blocks)]
    with _forward_hooks(specs):
        yield
