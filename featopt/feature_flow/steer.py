"""Steering with SAE features during generation (document 003, §5.3-5.4, Figures 9-11, 16, 17).

A **setting** changes a set of features at every position of every forward while the model
generates: mode `"scale"` multiplies each feature's contribution by `r` (`r = 0` deactivates a
theme, `r > 1` amplifies an active feature, `r = 1` changes nothing, bit for bit); mode `"add"`
adds `r * reference[node] * W_dec[i]` (activating a feature that is not active; the reference is
a typical activation of the feature, its max over some text,
:func:`~featopt.feature_flow.steer_edits.reference_activations`).
*Single-layer* steering acts on the initially chosen features; *multi-layer* steering on all
features of their flow graph, across layers, so an edit at an early site also reaches every later
one (the edits compose in one forward).

Each generation is scored against the unsteered model, by one clean forward of prompt + generation:
- **theme**: the mean activation of the `targets` features at the generated tokens' positions;
- **perplexity** of the generated tokens (coherence), with the fraction of distinct tokens
  (low: degenerate repetition);
- **word log-prob** (with theme words): the mean over steps of `log sum_ids softmax(steered logits)`,
  `ids` the first token of each word with and without a leading space.

The edits are built in :mod:`featopt.feature_flow.steer_edits`; the table, picture and JSON
record of a result in :mod:`featopt.feature_flow.steer_report`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet, Node, parse_node
from featopt.feature_flow.steer_edits import MODES, checked_nodes, reference_activations, steering_edits
from featopt.interventions.generate import generate
from featopt.models import ModelAdapter

BASELINE = "unsteered"


@dataclass
class Setting:
    """One steering intervention: `nodes` changed with coefficient `r` in `mode`. `strategy` names
    the line it belongs to in plots (`single`, `multi`); the name by default."""

    name: str
    nodes: list[Node]
    r: float
    mode: str = "scale"
    strategy: str = ""

    def __post_init__(self):
        self.nodes = [parse_node(n) for n in self.nodes]
        if not self.nodes:
            raise FeatoptError(f"setting {self.name!r} names no feature: give one or more features like 6/res/123.")
        if self.mode not in MODES:
            raise FeatoptError(f"setting {self.name!r} has unknown mode {self.mode!r}: allowed are {', '.join(MODES)}.")
        if not math.isfinite(float(self.r)):
            raise FeatoptError(f"setting {self.name!r} has r = {self.r}: r must be a finite number.")
        self.r, self.strategy = float(self.r), self.strategy or self.name

    def record(self) -> dict:
        return {"name": self.name, "nodes": [str(n) for n in self.nodes], "r": self.r, "mode": self.mode,
                "strategy": self.strategy}


@dataclass
class Generation:
    """One prompt's continuation under one setting, and its scores."""

    prompt: int
    ids: list[int]
    text: str
    theme: float
    perplexity: float
    distinct: float
    word_logprob: float | None = None


@dataclass
class Outcome:
    """A setting (None: the unsteered baseline) and its generations, one per prompt."""

    setting: Setting | None
    generations: list[Generation]

    @property
    def name(self) -> str:
        return BASELINE if self.setting is None else self.setting.name

    def mean(self, score: str) -> float | None:
        values = [getattr(g, score) for g in self.generations]
        return None if any(v is None for v in values) else sum(values) / len(values)

    def row(self) -> dict:
        s = self.setting
        return {"setting": self.name, "strategy": BASELINE if s is None else s.strategy, "mode": "" if s is None else s.mode,
                "r": None if s is None else s.r, "features": 0 if s is None else len(s.nodes),
                **{k: self.mean(k) for k in ("theme", "perplexity", "distinct", "word_logprob")}}


@dataclass
class SteeringResult:
    model: str
    prompts: list[list[int]]
    targets: list[Node]
    theme_words: list[str]
    theme_ids: list[int]
    baseline: Outcome
    outcomes: list[Outcome]
    max_new_tokens: int
    temperature: float
    seed: int
    reference: dict[Node, float] | None = None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One table row per setting, the baseline first: means over the prompts."""
        return [o.row() for o in [self.baseline, *self.outcomes]]

    def record(self) -> dict:
        from featopt.results import versions

        return {"model": self.model, "prompts": self.prompts, "targets": [str(n) for n in self.targets],
                "theme_words": self.theme_words, "theme_ids": self.theme_ids, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed, "notes": self.notes,
                "reference": None if self.reference is None else {str(n): v for n, v in self.reference.items()},
                "settings": [{**(o.setting.record() if o.setting else {"name": BASELINE}), "means": o.row(),
                              "generations": [asdict(g) for g in o.generations]} for o in [self.baseline, *self.outcomes]],
                "versions": versions()}


def prompt_ids(adapter: ModelAdapter, prompt) -> list[int]:
    """A text with the tokenizer's own special tokens (BOS where the model uses one), after the
    BOS token with `--bos` (`adapter.bos`; once, where the tokenizer writes none), or ids as given."""
    if isinstance(prompt, str):
        if adapter.tokenizer is None:
            raise FeatoptError(f"model {adapter.name!r} has no tokenizer: give prompts as token ids.")
        ids = adapter.tokenizer.encode(prompt, add_special_tokens=True)
        if adapter.bos and ids[:1] != [adapter.bos_token_id()]:
            ids = [adapter.bos_token_id(), *ids]
    else:
        ids = [int(i) for i in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
    if not ids:
        raise FeatoptError(f"prompt {prompt!r} has no tokens: give non-empty prompts.")
    if not all(0 <= i < adapter.vocab_size for i in ids):
        raise FeatoptError(f"prompt {prompt!r} has token ids outside the vocabulary (0-{adapter.vocab_size - 1}).")
    return ids


def _theme_ids(adapter: ModelAdapter, words: Sequence[str]) -> list[int]:
    ids = []
    for word in words:
        forms = [adapter.encode(" " + word.strip(), bos=False), adapter.encode(word.strip(), bos=False)]
        if not word.strip() or any(len(f) == 0 for f in forms):
            raise FeatoptError(f"theme word {word!r} has no tokens: give non-empty words.")
        ids += [int(f[0]) for f in forms]
    return list(dict.fromkeys(ids))


@torch.no_grad()
def _score(flow, adapter, prompt: list[int], new: list[int], targets: list[Node], steps: list[Tensor],
           theme_ids: list[int]) -> tuple[float, float, float, float | None]:
    """(theme, perplexity, distinct, word log-prob) of `new` after `prompt`, one clean forward."""
    ids = torch.tensor([prompt + new], device=adapter.device)
    sites = list(dict.fromkeys(flow.read_site(n.key) for n in targets))
    with adapter.hooks(read=sites) as acts:
        logits = adapter.model(input_ids=ids, use_cache=False).logits[0].double()  # [T + n, V]
    T, n = len(prompt), len(new)
    theme = sum(float(flow[t.key].encode(acts[flow.read_site(t.key)][0, T:])[:, t.index].double().mean()) for t in targets) / len(targets)
    # logits at T-1 .. T+n-2 predict the generated tokens T .. T+n-1
    ce = torch.nn.functional.cross_entropy(logits[T - 1:T + n - 1], ids[0, T:].to(logits.device))
    word = None
    if theme_ids:
        step = torch.stack(steps).double()  # [n, V] steered next-token logits
        word = float((step[:, theme_ids].logsumexp(-1) - step.logsumexp(-1)).mean())
    return theme, math.exp(float(ce)), len(set(new)) / n, word


def steer(flow: FlowSet, adapter: ModelAdapter, prompts: Sequence[str | Sequence[int]], settings: Sequence[Setting], *,
          targets: Sequence[Node | str], max_new_tokens: int = 32, theme_words: Sequence[str] = (),
          temperature: float = 0.0, seed: int = 0, reference: dict[Node, float] | None = None,
          progress: bool = True) -> SteeringResult:
    """Generate from every prompt unsteered and under each setting, and score every generation.

    Greedy by default; with `temperature > 0` prompt i samples from a generator seeded `seed + i`,
    so every setting sees the same random stream. Add-mode settings without `reference` use the
    features' max activations over the prompts themselves (noted in the result).
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str) or not prompts:
        raise FeatoptError("no prompt given: give a list of one or more prompts.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise FeatoptError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise FeatoptError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}.")
    names = [s.name for s in settings]
    if len(set(names)) < len(names) or BASELINE in names:
        raise FeatoptError(f"setting names must be distinct and not {BASELINE!r}, got {names}.")
    flow.check_model(adapter)
    targets = checked_nodes(flow, targets, "the theme score (targets)")
    for s in settings:
        checked_nodes(flow, s.nodes)
    encoded = [prompt_ids(adapter, p) for p in prompts]
    theme_ids = _theme_ids(adapter, theme_words)
    notes = []
    add_nodes = list(dict.fromkeys(n for s in settings if s.mode == "add" for n in s.nodes))
    if add_nodes and reference is None:
        reference = {}
        for ids in encoded:
            if len(ids) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = reference_activations(flow, adapter, add_nodes, torch.tensor([ids]))
                reference = {n: max(reference.get(n, 0.0), v) for n, v in ref.items()}
        reference = {n: reference.get(n, 1.0) for n in add_nodes}
        notes.append("add-mode reference activations are the features' max over the prompts (1.0 where never active).")

    bar = tqdm(total=(len(settings) + 1) * len(encoded), desc="steering", disable=not progress, leave=False)
    outcomes = []
    for setting in [None, *settings]:
        edits = None if setting is None else steering_edits(flow, setting.nodes, setting.r, mode=setting.mode,
                                                            reference=reference)
        generations = []
        for i, ids in enumerate(encoded):
            steps: list[Tensor] = []
            generator = torch.Generator().manual_seed(seed + i) if temperature > 0 else None
            new = generate(adapter, torch.tensor(ids), max_new_tokens, edits=edits, temperature=temperature,
                           generator=generator, logits_out=steps)
            scores = _score(flow, adapter, ids, new, targets, steps, theme_ids)
            generations.append(Generation(i, new, adapter.decode(new), *scores))
            bar.update()
        outcomes.append(Outcome(setting, generations))
    bar.close()
    return SteeringResult(adapter.name, encoded, targets, list(theme_words), theme_ids, outcomes[0], outcomes[1:],
                          max_new_tokens, float(temperature), seed, reference, notes)


def compare_single_multi(flow: FlowSet, adapter: ModelAdapter, prompts, *, single: Sequence[Node | str],
                         multi: Sequence[Node | str], rs: Sequence[float], mode: str = "scale",
                         targets: Sequence[Node | str] | None = None, **kwargs) -> SteeringResult:
    """Single-layer (`single`, the initial features) against multi-layer (`multi`, their flow
    graph's features) steering at every `r`, one shared baseline; targets default to `single`."""
    if not rs:
        raise FeatoptError("no r given: give one or more steering coefficients.")
    settings = [Setting(f"{strategy} r={r:g}", list(nodes), r, mode, strategy)
                for strategy, nodes in (("single", single), ("multi", multi)) for r in rs]
    return steer(flow, adapter, prompts, settings, targets=list(single if targets is None else targets), **kwargs)
