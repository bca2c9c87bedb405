"""Clamping an MLP neuron (source document 004, "Flash Interpretability", Figures 3 and 4).

A neuron's output is its post-activation value, the site `blocks.L.mlp_hidden` (the input of the
down-projection). :func:`clamp` holds it at a value for every forward inside a `with` block, through
the adapter's write hooks, which are always removed. :func:`clamp_sweep` records a target token's
next-token probability after a prompt for a range of clamped values (Figure 3);
:func:`featopt.interventions.generate.generate`
continues a prompt greedily with the neuron held (Figure 4). `run_clamp(ClampConfig(...))` is the
entry point of `featopt neurons clamp`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter

_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"  # not \d: other scripts' digits


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
    """The target's token ids (the first only, or all) and a note when it is several tokens."""
    from featopt.weights.find import resolve_tokens

    return resolve_tokens(adapter, target, None, multi)


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


@dataclass
class ClampConfig:
    """Settings of `featopt neurons clamp`."""

    model: str = "tiny-llama"
    bos: bool = False  # start the model input with its BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int = 0
    neuron: int = 0
    prompt: str = "My favourite animal is"
    target: str | None = " dog"  # the next token whose probability is swept (None: no sweep)
    values: str = "-500:500:21"  # start:stop:count or a list
    multi: str = "first"  # a target of several tokens: first, or all (their joint probability)
    generate: int = 0  # greedy tokens to generate with the neuron held (0: none)
    hold: float | None = None  # the value held while generating (default: the largest of --values)
    chat: bool = False  # wrap the prompt in the chat template when generating (instruct models)
    plot: bool = True
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    out: str | None = None


@dataclass
class ClampRun:
    values: Tensor  # [S]
    probs: Tensor | None  # [S]
    baseline: float | None  # unclamped probability of the target
    natural: float  # the neuron's unclamped value at the prompt's last position
    target_ids: list[int]
    note: str
    generations: dict | None  # {"unclamped": text, "clamped": text, "hold": value}
    out: Path
    png: Path | None = None


def run_clamp(config: ClampConfig, adapter: ModelAdapter | None = None) -> ClampRun:
    from featopt.results import atomic_write
    from featopt.discrete.common import load, out_dir
    from featopt.weights.neurons import check_config

    check_config(config)
    if not config.prompt.strip():
        raise FeatoptError("--prompt is empty or only whitespace: give a text to continue.")
    if config.target == "":
        raise FeatoptError("--target is empty: give the text of the token to sweep (e.g. ' dog'), or null for no sweep.")
    if config.generate < 0:
        raise FeatoptError(f"--generate must be 0 (none) or more, got {config.generate}.")
    values = parse_values(config.values)
    adapter = load(config, adapter)
    prompt = adapter.encode(config.prompt)
    if not len(prompt):
        raise FeatoptError("--prompt encodes to no token: give a non-empty prompt.")
    adapter.check_positions(len(prompt) + config.generate, f"--prompt of {len(prompt)} tokens and --generate {config.generate}",
                            "shorten the prompt or generate fewer tokens")
    site = check_neuron(adapter, config.layer, config.neuron)
    with torch.no_grad():
        natural = float(adapter.run([site], input_ids=prompt[None])[site][0, -1, config.neuron])
    ids, note, probs, baseline = [], "", None, None
    if config.target:
        ids, note = target_ids(adapter, config.target, config.multi)
        probs = clamp_sweep(adapter, config.layer, config.neuron, prompt, ids, values)
        baseline = float(sequence_probs(adapter, prompt, ids, 1)[0])
    generations = None
    if config.generate > 0:
        start = chat_prompt(adapter, config.prompt) if config.chat else prompt
        hold = float(values.max()) if config.hold is None else config.hold
        from featopt.interventions.generate import generate

        generations = {"unclamped": adapter.decode(generate(adapter, start, config.generate)),
                       "clamped": adapter.decode(generate(adapter, start, config.generate, (config.layer, config.neuron, hold))),
                       "hold": hold}
    out = out_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    run = ClampRun(values, probs, baseline, natural, ids, note, generations, out)
    if probs is not None and config.plot:
        from featopt.plots import plot_sweep

        title = f"p({adapter.decode(ids)!r} | {config.prompt!r}), layer {config.layer} neuron {config.neuron} clamped"
        run.png = plot_sweep(values, probs, out / "clamp.png", title=title, natural=natural, baseline=baseline)
    document = {"config": asdict(config), "model": adapter.name, "target_ids": ids, "note": note, "natural": natural,
                "baseline": baseline, "values": values.tolist(), "probs": None if probs is None else probs.tolist(),
                "generations": generations}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "clamp.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return run


def format_clamp(run: ClampRun, width: int = 40) -> str:
    lines = [run.note] if run.note else []
    lines.append(f"natural value at the last prompt position: {run.natural:.4g}")
    if run.probs is not None:
        lines.append(f"unclamped probability: {run.baseline:.4g}")
        lines += [f"{v:>10.4g}  {p:.4f}  {'#' * round(width * p)}" for v, p in zip(run.values.tolist(), run.probs.tolist())]
    if run.generations:
        lines.append(f"unclamped: {run.generations['unclamped']!r}")
        lines.append(f"clamped at {run.generations['hold']:.4g}: {run.generations['clamped']!r}")
    if run.png:
        lines.append(f"plot: {run.png}")
    return "\n".join(lines)
