"""`featopt neurons clamp`: hold an MLP neuron at a sweep of values and record a target token's
probability after a prompt (source document 004, Figure 3; `clamp.json`, `clamp.png`), and with
`--generate` continue the prompt greedily with the neuron held (Figure 4). The intervention itself
is :mod:`featopt.interventions.clamp`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.commands.fields import record_of
from featopt.commands.loading import load_for
from featopt.commands.result import CommandResult
from featopt.commands.settings import FolderSettings, InputSettings, UntrainedSettings
from featopt.errors import FeatoptError
from featopt.interventions.clamp import chat_prompt, check_neuron, clamp_sweep, parse_values, sequence_probs, target_ids
from featopt.interventions.generate import generate
from featopt.models import ModelAdapter, dtype_of
from featopt.results import atomic_write
from featopt.runs.outdir import out_folder


@dataclass
class ClampConfig(FolderSettings, UntrainedSettings, InputSettings):
    """Settings of `featopt neurons clamp`."""

    bos: bool = False
    """start the model input with its BOS token (default off: as the source documents encode)"""
    layer: int = 0
    """block index, 0-based (the documents' Block 1 is layer 0)"""
    neuron: int = 0
    """the neuron's index in the block's MLP"""
    prompt: str = "My favourite animal is"
    """the text after which the target's probability is measured (and which --generate continues)"""
    target: str | None = " dog"
    """the next token whose probability is swept (null: no sweep)"""
    values: str = "-500:500:21"
    """the clamped values: start:stop:count (both ends included) or a list such as 0,10,145"""
    multi: str = "first"
    """a target of several tokens: first (its first token), or all (their joint probability)"""
    generate: int = 0
    """greedy tokens to generate with the neuron held (0: none)"""
    hold: float | None = None
    """the value held while generating (default: the largest of --values)"""
    chat: bool = False
    """wrap the prompt in the chat template when generating (instruct models)"""
    plot: bool = True
    """write clamp.png (the paper's Figure 3)"""
    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda, cuda:N or mps"""


@dataclass
class ClampRun(CommandResult):
    values: Tensor  # [S]
    probs: Tensor | None  # [S]
    baseline: float | None  # unclamped probability of the target
    natural: float  # the neuron's unclamped value at the prompt's last position
    target_ids: list[int]
    note: str
    generations: dict | None  # {"unclamped": text, "clamped": text, "hold": value}
    out: Path
    png: Path | None = None

    def table(self, width: int = 40) -> str:
        lines = [self.note] if self.note else []
        lines.append(f"natural value at the last prompt position: {self.natural:.4g}")
        if self.probs is not None:
            lines.append(f"unclamped probability: {self.baseline:.4g}")
            lines += [f"{v:>10.4g}  {p:.4f}  {'#' * round(width * p)}" for v, p in zip(self.values.tolist(), self.probs.tolist())]
        if self.generations:
            lines.append(f"unclamped: {self.generations['unclamped']!r}")
            lines.append(f"clamped at {self.generations['hold']:.4g}: {self.generations['clamped']!r}")
        if self.png:
            lines.append(f"plot: {self.png}")
        return "\n".join(lines)


def _check(config: ClampConfig) -> Tensor:
    """Refuse bad settings before any model is loaded; the parsed --values."""
    dtype_of(config.dtype)
    if not config.prompt.strip():
        raise FeatoptError("--prompt is empty or only whitespace: give a text to continue.")
    if config.target == "":
        raise FeatoptError("--target is empty: give the text of the token to sweep (e.g. ' dog'), or null for no sweep.")
    if config.generate < 0:
        raise FeatoptError(f"--generate must be 0 (none) or more, got {config.generate}.")
    return parse_values(config.values)


def clamp(config: ClampConfig, adapter: ModelAdapter | None = None) -> ClampRun:
    """Sweep the clamped neuron over --values (the target's probability after --prompt) and, with
    --generate, continue the prompt unclamped and clamped; writes `clamp.json` (and `clamp.png`)."""
    values = _check(config)
    adapter = load_for(config, adapter)
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
        generations = {"unclamped": adapter.decode(generate(adapter, start, config.generate)),
                       "clamped": adapter.decode(generate(adapter, start, config.generate, (config.layer, config.neuron, hold))),
                       "hold": hold}
    out = out_folder(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = ClampRun(values, probs, baseline, natural, ids, note, generations, out)
    if probs is not None and config.plot:
        from featopt.plots import plot_sweep

        title = f"p({adapter.decode(ids)!r} | {config.prompt!r}), layer {config.layer} neuron {config.neuron} clamped"
        run.png = plot_sweep(values, probs, out / "clamp.png", title=title, natural=natural, baseline=baseline)
    document = {"config": record_of(config), "model": adapter.name, "target_ids": ids, "note": note, "natural": natural,
                "baseline": baseline, "values": values.tolist(), "probs": None if probs is None else probs.tolist(),
                "generations": generations}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "clamp.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return run
