"""Clamping an MLP neuron (source document 004, "Flash Interpretability", Figures 3 and 4).

A neuron's output is its post-activation value, the site `blocks.L.mlp_hidden` (the input of the
down-projection). :func:`clamp` holds it at a value for every forward inside a `with` block, through
the adapter's write hooks, which are always removed. :func:`clamp_sweep` records a target token's
next-token probability after a prompt for a range of clamped values (Figure 3);
:func:`featopt.interventions.generate.generate` continues a prompt greedily with the neuron held
(Figure 4). `featopt neurons clamp` (:mod:`featopt.commands.clamp`) runs them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter

_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"  # not \d: other scripts' digits
MULTI = ("first", "all")  # a word of several tokens: its first token, or all of them


def check_neuron(adapter: ModelAdapter, layer: int, neuron: int):
    """The `mlp_hidden` site of block `layer`, once the layer and the neuron are known to exist."""
    site = adapter.site("mlp_hidden", layer)
    width = adapter.width(site)
    if not 0 <= neuron < width:
        raise FeatoptError(f"neuron {neuron} is out of range: block {layer}'s MLP has {width} neurons (0-{width - 1}).")
    return site


@contextlib.contextmanager
def clamp(adapter: ModelAdapter, layer: int, neuron: int, value: float | Tensor) -> Iterator[None]:
    """Hold neuron `neuron` of block `layer` at `value` at every position of every forward in the block.

    `value`: a number, or a tensor broadcastable to `[batch, tokens]` (per row, or per position:
    each position its own value; with a KV cache a forward sees one new token, so use a number).
    A neuron's "natural value" is per position: holding every position at the neuron's own unclamped
    values `[batch, tokens]` changes nothing (tested); one number everywhere changes all positions
    whose value differs. Clamps nest (several neurons at once).
    """
    site = check_neuron(adapter, layer, neuron)

    def write(act: Tensor, _site) -> Tensor:
        act = act.clone()  # never modify the module's own output in place
        v = value.to(act) if isinstance(value, Tensor) else value
        try:
            act[..., neuron] = v
        except RuntimeError as error:
            raise FeatoptError(f"clamp value of shape {list(v.shape)} does not fit activations [batch, tokens] = "
                               f"{list(act.shape[:2])}.") from error
        return act

    with adapter.hooks(write={site: write}):
        yield


def parse_values(spec: str | float | list) -> Tensor:
    """`"-500:500:21"` (start:stop:count, both ends included), `"0,10,145"` or a number -> `[S]` float64."""
    if isinstance(spec, (int, float)):
        return torch.tensor([float(spec)], dtype=torch.float64)
    if isinstance(spec, (list, tuple)):
        return torch.tensor([float(v) for v in spec], dtype=torch.float64)
    text = str(spec).replace(" ", "")
    m = re.fullmatch(f"({_NUMBER}):({_NUMBER}):([0-9]+)", text)
    if m and int(m[3]) >= 1:
        return torch.linspace(float(m[1]), float(m[2]), int(m[3]), dtype=torch.float64)
    if re.fullmatch(f"{_NUMBER}(,{_NUMBER})*", text):
        return torch.tensor([float(v) for v in text.split(",")], dtype=torch.float64)
    raise FeatoptError(f"--values {spec!r} is malformed: write start:stop:count (like -500:500:21) or a list (like 0,10,145).")


def target_ids(adapter: ModelAdapter, target: str, multi: str = "first") -> tuple[list[int], str]:
    """The token ids of the word `target` (the first only, or all) and a note when it is several tokens."""
    if multi not in MULTI:
        raise FeatoptError(f"--multi {multi!r} is not known: allowed are first and all.")
    ids = adapter.encode(target, bos=False).tolist()
    if not ids:
        raise FeatoptError(f"{target!r} encodes to no token: give a non-empty word.")
    if len(ids) == 1:
        return ids, ""
    pieces = ", ".join(repr(adapter.decode([i])) for i in ids)
    if multi == "first":
        return ids[:1], (f"{target!r} is {len(ids)} tokens ({pieces}): using the first, {adapter.decode(ids[:1])!r} "
                         "(--multi all uses all).")
    return ids, f"{target!r} is {len(ids)} tokens ({pieces}): using all of them (their summed probability)."


@torch.no_grad()
def sequence_probs(adapter: ModelAdapter, prompt: Tensor, target: list[int], rows: int) -> Tensor:
    """`[rows]`: probability that `target` follows `prompt [T]` (its tokens' product, teacher-forced)."""
    ids = torch.cat([prompt, torch.tensor(target[:-1], dtype=torch.long)]).expand(rows, -1)
    logprobs = adapter.logits(ids)[:, len(prompt) - 1:].double().log_softmax(-1)  # [rows, len(target), V]
    picked = logprobs.gather(2, torch.tensor(target, device=logprobs.device).expand(rows, -1)[..., None])
    return picked[..., 0].sum(1).exp().cpu()


@torch.no_grad()
def clamp_sweep(adapter: ModelAdapter, layer: int, neuron: int, prompt: Tensor, target: list[int], values: Tensor,
                batch_size: int = 32) -> Tensor:
    """`[S]`: the target's probability after `prompt [T]` with the neuron clamped to each of `values [S]`."""
    out = []
    for v in values.split(batch_size):
        with clamp(adapter, layer, neuron, v.to(adapter.dtype)[:, None]):  # one value per row, every position
            out.append(sequence_probs(adapter, prompt, target, len(v)))
    return torch.cat(out).double()


def chat_prompt(adapter: ModelAdapter, text: str) -> Tensor:
    """`text` as a user turn in the model's chat template, ready for the assistant's answer."""
    tok = adapter.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise FeatoptError(f"model {adapter.name!r} has no chat template: drop --chat.")
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(rendered, add_special_tokens=False)
    if adapter.bos and ids[:1] != [adapter.bos_token_id()]:  # many templates already write the BOS
        ids = [adapter.bos_token_id(), *ids]
    return torch.tensor(ids, dtype=torch.long)
