"""Generation with the KV cache while edits are installed (clamped neurons, steered features)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor

from featopt.interventions.clamp import clamp
from featopt.interventions.edits import edited
from featopt.models import ModelAdapter


@torch.no_grad()
def generate(adapter: ModelAdapter, prompt: Tensor, max_new_tokens: int, clamped: tuple[int, int, float] | None = None,
             stop_at_eos: bool = True, *, edits: Iterable | None = None, temperature: float = 0.0,
             generator: torch.Generator | None = None, logits_out: list | None = None) -> list[int]:
    """Continue `prompt [T]` for up to `max_new_tokens` tokens with the KV cache; the new ids.

    `clamped = (layer, neuron, value)` holds an MLP neuron; `edits` (a list of
    :class:`~featopt.interventions.edits.Edit`) are installed for every step, so each new token's
    forward is edited exactly as a full forward would be at that position. `temperature` 0 is
    greedy (argmax); above 0 samples from `softmax(logits / temperature)` with `generator`.
    `logits_out`, when given, receives each step's next-token logits `[V]` (float32, CPU).
    """
    from transformers import DynamicCache

    guards = contextlib.ExitStack()
    if clamped:
        guards.enter_context(clamp(adapter, *clamped))
    if edits:
        guards.enter_context(edited(adapter, edits))
    eos = getattr(adapter.tokenizer, "eos_token_id", None) if stop_at_eos else None
    new, ids = [], prompt.reshape(1, -1).to(adapter.device)
    cache = DynamicCache(config=adapter.model.config)
    with guards:
        for _ in range(max_new_tokens):
            logits = adapter.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].float()
            if logits_out is not None:
                logits_out.append(logits.cpu())
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            new.append(token)
            if token == eos:
                break
            ids = torch.tensor([[token]], device=adapter.device)
    return new
