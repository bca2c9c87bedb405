"""The inputs that make features fire, measured against the corpus: for every feature of a set at
once (an SAE's latents, neurons, directions), a fluent input and a most active input, each set
beside the feature's corpus maximum and its corpus text's fluency.

One pooled EPO search (Thompson et al. 2024, "Fluent dreaming for language models";
:mod:`featopt.discrete.epo`) over all features: each feature has one member per fluency weight
lambda (member m minimizes `-activation + lambda_m * xent`) and one per *budget* weight mu
(`-activation + mu * max(xent - threshold, 0)`, with the feature's fluency threshold below: it
climbs the activation freely while it stays as fluent as the corpus, which is what the best
fluent input asks; a plain lambda trades activation for fluency far below the threshold). Every
candidate any member proposes is forwarded once, to the LM head, and scored for *every* feature
(`Objective.loss_all`) and for its cross-entropy, which is the sequence's own. Each member ranks
every candidate by its own feature and weight; each feature's Pareto front (activation up, xent
down) takes every candidate. Features that fire on related text find each other's inputs.

Warm starts: each feature's strongest corpus windows (:mod:`featopt.dictionaries.corpus_windows`)
are scored for every feature before the first step (the "seeds"), and member m starts from
window m (`init="corpus"`; a feature short of windows, or `init` random or a text, starts from
those). The search begins where the corpus left off.

Per feature the answer is its front, the **best** input (the front's most active point) and the
**best fluent** input (the most active point whose xent is at most the feature's fluency threshold,
the median xent of its corpus windows), each re-measured by a plain forward on the feature itself
(for SAE latents the searched score is the firing score, see `SparseAutoencoder.firing_score`;
the latent is what is reported), with its per-token activation for shading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from featopt.dictionaries.corpus_windows import CorpusWindows, Fluency, fluency
from featopt.dictionaries.search_history import SLACK, SearchHistory, history_of
from featopt.discrete.candidates import prompt_xent
from featopt.discrete.epo import Front, check_length, epo
from featopt.discrete.measure import remeasure
from featopt.discrete.swap_search import SwapSettings
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.objectives import Objective
from featopt.objectives.problems import labels


@dataclass
class InputSearch:
    """How the inputs are searched (the flags of `featopt sae inputs` and the dashboard's)."""

    tokens: int = 8  # N searched tokens after the prefix
    steps: int = 30
    search_width: int = 32  # candidates per member and step
    topk: int = 64  # tokens per position that swaps are drawn from
    lambdas: list[float] = field(default_factory=lambda: [0.0])  # EPO members: -activation + lambda * xent
    budget: list[float] = field(default_factory=lambda: [4.0])  # members: -activation + mu * max(xent - threshold, 0)
    likely: int = 256  # budget members draw swaps among the model's M likeliest tokens per position (0: all)
    warm: int = 8  # strongest corpus windows per feature scored before the first step
    sweep: int = 0  # the exhaustive sweep's best single tokens per feature, each ending its 2 best windows (0: none)
    buffer_size: int = 4
    pool: bool = True  # score every candidate for every feature
    front_size: int = 16  # front points kept per feature (evenly spread)
    batch_size: int = 0
    seed: int = 0
    progress: bool = True

    def check(self, flags: dict[str, str] | None = None) -> None:
        """One sentence on a setting that cannot run; `flags` renames settings to the flags a
        command gives them (the dashboard's `input_tokens`)."""
        flag = {name: f"--{name}" for name in ("tokens", "search_width", "topk", "buffer_size", "front_size", "steps",
                                               "warm", "sweep", "likely", "lambdas", "budget")} | (flags or {})
        for name in ("tokens", "search_width", "topk", "buffer_size", "front_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FeatoptError(f"{flag[name]} must be a whole number of at least 1, got {value!r}.")
        for name in ("steps", "warm", "sweep", "likely"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FeatoptError(f"{flag[name]} must be a whole number of 0 or more, got {value!r}.")
        for name in ("lambdas", "budget"):
            weights = getattr(self, name)
            if (not isinstance(weights, (list, tuple))
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                               for v in weights)):
                raise FeatoptError(f"{flag[name]} {weights!r} is not valid: give a list of finite, non-negative weights, "
                                   "like [0, 2].")
            if len(set(weights)) != len(weights):
                raise FeatoptError(f"{flag[name]} {weights!r} repeats a weight: give distinct weights.")
        if not self.lambdas and not self.budget:
            raise FeatoptError(f"{flag['lambdas']} and {flag['budget']} are both empty: give at least one member weight.")

    def swap_settings(self) -> SwapSettings:
        return SwapSettings(steps=self.steps, search_width=self.search_width, topk=self.topk,
                            buffer_size=self.buffer_size, seed=self.seed, progress=self.progress, desc="inputs")


@dataclass
class Found:
    """What the search found for every feature, before re-measuring: the whole fronts, the
    final members, the corpus yardstick and the cost."""

    fronts: list[Front]
    windows: CorpusWindows
    fluency: Fluency
    evaluations: int  # candidate sequences forwarded (each scored for every feature when pooled)
    sweep_forwards: int  # single tokens the exhaustive sweep scored (each for every feature; 0: no sweep)
    per_feature: list[int]  # sequences each feature's members brought
    steps: int
    # After each step (0: the starts), per feature: sequences brought so far `forwards [S+1, P]`,
    # and the best activation `best [S+1, P]` and best fluent one `fluent [S+1, P]` (NaN: none
    # yet) among everything scored for it so far, its corpus windows as inputs included.
    history: dict[str, Tensor] = field(default_factory=dict)


def starts(windows: CorpusWindows, n_members: int, init: Tensor | str, allowed: Tensor, n_tokens: int,
           seed: int) -> Tensor:
    """Each member's first sequence `[P * n_members, N]`, problem-major: member m of feature p
    starts from `init` when it is ids `[N]`; with "corpus", from p's window m while there is one;
    otherwise from random allowed tokens (drawn by `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(len(windows)):
        for m in range(n_members):
            if isinstance(init, Tensor):
                rows.append(init)
            elif init == "corpus" and m < len(windows.windows[p]):
                rows.append(windows.windows[p][m])
            else:
                rows.append(allowed[torch.randint(0, len(allowed), (n_tokens,), generator=gen)])
    return torch.stack(rows).long()


def search(adapter: ModelAdapter, objective: Objective, measure: Objective, windows: CorpusWindows, *,
           prefix: Tensor, allowed: Tensor, settings: InputSearch, init: Tensor | str = "corpus") -> Found:
    """Search inputs of `settings.tokens` tokens after `prefix [L]` for every problem of
    `objective` (read at the input's last token), with `windows` as warm starts and yardstick;
    `measure` is what the corpus and the answers are measured on (the latents themselves when
    `objective` climbs their firing scores). `init`: where members start (see :func:`starts`)."""
    settings.check()
    P, N = objective.n_problems, settings.tokens
    if len(windows) != P:
        raise FeatoptError(f"the corpus windows cover {len(windows)} features but the objective has {P}.")
    check_length(prefix, torch.zeros(1, N))
    warm = windows.top(settings.warm)
    fluent = fluency(adapter, measure, windows, prefix)
    weights = list(settings.lambdas) + list(settings.budget)
    n_lam = len(weights)
    # Budget members pay only above the feature's threshold (none without windows: plain lambda).
    budget_floor = torch.nan_to_num(fluent.threshold, nan=0.0)[:, None].expand(-1, len(settings.budget))
    floors = torch.cat([torch.zeros(P, len(settings.lambdas), dtype=torch.float64), budget_floor], dim=1)
    first = starts(warm, n_lam, init, allowed.cpu(), N, settings.seed)
    seeds = [(p, w) for p in range(P) for w in warm.windows[p]] + _sweep_seeds(adapter, objective, warm, first, n_lam,
                                                                               prefix, allowed, settings)
    pooled = settings.pool and P > 1
    own_seeds = torch.bincount(torch.tensor([p for p, _ in seeds], dtype=torch.long), minlength=P) if seeds else (
        torch.zeros(P, dtype=torch.long))
    grown = [Front() for _ in range(P)]
    track = SearchHistory(grown, fluent, 0 if pooled else own_seeds)
    seed_ids = torch.stack([w for _, w in seeds]).long() if seeds and pooled else None
    seed_owner = torch.tensor([p for p, _ in seeds]) if seeds and pooled else None
    state, fronts = epo(adapter, objective, prefix=prefix, init=first, allowed=allowed, settings=settings.swap_settings(),
                        lambdas=weights, batch_size=settings.batch_size, pool=pooled, seeds=seed_ids,
                        seed_problems=seed_owner, floors=floors, fronts=grown, on_step=track,
                        likely=[0] * len(settings.lambdas) + [settings.likely] * len(settings.budget))
    per_feature = [int(v) for v in state.evaluations]
    if not pooled:
        # Unpooled, each feature's own windows and sweep seeds enter its front (scored for it alone, counted).
        for p in range(P):
            own = [w for q, w in seeds if q == p]
            if own:
                _add_windows(adapter, objective, fronts[p], p, torch.stack(own).long(), prefix)
                per_feature[p] += len(own)
    swept = len(allowed) if settings.sweep else 0
    return Found(fronts, windows, fluent, sum(per_feature), swept, per_feature, state.steps_run, track.tensors())


def _sweep_seeds(adapter, objective, warm: CorpusWindows, first: Tensor, n_members: int, prefix: Tensor,
                 allowed: Tensor, settings: InputSearch) -> list[tuple[int, Tensor]]:
    """Each feature's best single tokens (one exhaustive sweep after the prefix, every feature at
    once), each put last in the feature's two best windows (or its first members' starts): a token
    that fires a feature alone may fire it after text too. (On 100 SmolLM2 latents it changed
    nothing at 10 steps: " deck" fires one at 2.7x its corpus max alone, not after its windows.)"""
    if not settings.sweep:
        return []
    from featopt.discrete.exhaustive import exhaustive

    top = exhaustive(adapter, objective, prefix=prefix, candidates=allowed.to(adapter.device), k=settings.sweep,
                     batch_size=settings.batch_size, progress=settings.progress)
    seeds = []
    for p in range(objective.n_problems):
        bases = list(warm.windows[p][:2]) or [first[p * n_members]]
        for t in top.ids[:, p].cpu().tolist():
            if t >= 0:
                seeds += [(p, torch.cat([base[:-1], torch.tensor([t])]).long()) for base in bases]
    return seeds


def _add_windows(adapter, objective, front: Front, p: int, windows: Tensor, prefix: Tensor) -> None:
    ids = torch.cat([prefix.cpu().expand(len(windows), -1), windows], dim=1)
    measured = remeasure(adapter, objective, ids, torch.full((len(ids),), p))
    front.add(windows, measured.score, prompt_xent(adapter, ids, len(prefix)))


def _point(adapter: ModelAdapter, ids: list[int], activation: float, xent: float, per_position: list[float] | None,
           maximum: float, prefix_length: int) -> dict:
    return {"token_ids": ids, "tokens": [adapter.decode([t]) for t in ids], "text": adapter.decode(ids[prefix_length:]),
            "activation": activation, "xent": xent, "acts": per_position,
            "ratio": activation / maximum if maximum > 0 else None}


def _with_windows(found: Found, p: int) -> Front:
    """Feature p's front with every corpus window added as the input it is (measured when the
    threshold was: a window beyond the `warm` ones was never searched from, yet it is an input)."""
    front, windows = Front(), found.windows.windows[p]
    searched = found.fronts[p]
    front.add(searched.ids, searched.activation, searched.xent)
    if len(windows):
        front.add(windows, found.fluency.standalone[p], found.fluency.xent[p])
    return front


def records(adapter: ModelAdapter, measure: Objective, found: Found, prefix: Tensor, front_size: int) -> list[dict]:
    """One JSON-able record per feature: corpus max, fluency threshold, the front (its corpus
    windows included, spread to `front_size` points), best and best fluent inputs,
    each re-measured by a plain forward on `measure`, and the search's cost."""
    out = []
    L = len(prefix)
    for p, (site, spec) in enumerate(labels(measure)):
        whole = _with_windows(found, p)
        keep = whole.spread(front_size)
        threshold = float(found.fluency.threshold[p])
        picks = [i for i in (whole.best(), whole.best(threshold + SLACK) if threshold == threshold else None)
                 if i is not None]
        ids = torch.cat([keep.ids, whole.ids[picks]]) if picks else keep.ids
        full = torch.cat([prefix.cpu().expand(len(ids), -1), ids], dim=1)
        measured = remeasure(adapter, measure, full, torch.full((len(full),), p))
        xent = prompt_xent(adapter, full, L)
        maximum = float(found.windows.maximum[p])
        points = [_point(adapter, full[i].tolist(), float(measured.activation[i]), float(xent[i]),
                         measured.per_position[i], maximum, L) for i in range(len(full))]
        front = points[:len(keep.ids)]
        extra = points[len(keep.ids):]
        best = max(front + extra, key=lambda q: q["activation"]) if points else None
        fluent = [q for q in front + extra if threshold == threshold and q["xent"] <= threshold + SLACK]
        best_fluent = max(fluent, key=lambda q: q["activation"]) if fluent else None
        corpus_xent = found.fluency.xent[p]
        out.append({
            "site": site, "spec": spec, "corpus_max": maximum, "corpus_windows": len(found.windows.windows[p]),
            "corpus_window_xent": [float(x) for x in corpus_xent],
            "corpus_window_activation": [float(a) for a in found.windows.activations[p]],
            "corpus_window_alone": [float(a) for a in found.fluency.standalone[p]],
            "fluency_threshold": threshold if threshold == threshold else None,
            "best": best, "best_fluent": best_fluent,
            "best_ratio": best["ratio"] if best else None,
            "best_fluent_ratio": best_fluent["ratio"] if best_fluent else None,
            "beats_corpus": bool(best and best["activation"] >= maximum > 0),
            "fluent_beats_corpus": bool(best_fluent and best_fluent["activation"] >= maximum > 0),
            "front": sorted(front, key=lambda q: q["xent"]),
            "forward_evaluations": found.per_feature[p], "steps": found.steps,
            "history": history_of(found.history, p),
        })
    return out


def summary(rows: list[dict]) -> dict:
    """The run's figures over features that fire in the corpus: how many inputs reach the corpus
    max, the median ratios, the median xent of best fluent inputs beside the corpus median."""
    fired = [r for r in rows if r["corpus_max"] > 0]

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[(len(values) - 1) // 2] if values else None

    return {"features": len(rows), "firing_in_corpus": len(fired),
            "best_at_least_corpus_max": sum(r["beats_corpus"] for r in fired),
            "fluent_at_least_corpus_max": sum(r["fluent_beats_corpus"] for r in fired),
            "median_best_ratio": median(r["best_ratio"] or 0.0 for r in fired),
            "median_fluent_ratio": median(r["best_fluent_ratio"] or 0.0 for r in fired),
            "median_fluent_xent": median((r["best_fluent"] or {}).get("xent") for r in fired),
            "median_corpus_xent": median(r["fluency_threshold"] for r in fired)}


def plot(rows: list[dict], path, most: int = 20) -> None:
    """One panel per feature (the first `most`): its front (xent against activation, re-measured),
    its corpus windows as inputs, the corpus max (dashed) and the fluency threshold (dotted)."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    shown = rows[:most]
    cols = max(1, min(4, len(shown)))
    n_rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 2.9 * n_rows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        front = r["front"]
        ax.plot([q["xent"] for q in front], [q["activation"] for q in front], "o-", ms=3, lw=1, label="front")
        ax.plot(r["corpus_window_xent"], r["corpus_window_alone"], ".", ms=4, color="tab:gray", label="corpus windows")
        if r["corpus_max"] > 0:
            ax.axhline(r["corpus_max"], ls="--", lw=0.8, color="tab:red", label="corpus max")
        if r["fluency_threshold"] is not None:
            ax.axvline(r["fluency_threshold"], ls=":", lw=0.8, color="tab:green", label="fluency threshold")
        ax.set_title(f"{r['site']} {r['spec']}", fontsize=8)
        ax.set_xlabel("xent (nats/token)", fontsize=7)
        ax.set_ylabel("activation", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if shown:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("Inputs against the corpus: activation and the model's cross-entropy of the input", fontsize=9)
    fig.tight_layout()
    save_figure(fig, plt, path)
