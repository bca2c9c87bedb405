"""Records every sequence EPO's swap search scores, for tests that re-score them all by plain
forwards (the search must keep the best of exactly what it scored)."""

from __future__ import annotations

from torch import Tensor


def record_scored(monkeypatch) -> list[tuple[Tensor, Tensor | None]]:
    """Patch `featopt.discrete.epo.swap_search` for this test; the returned list fills with one
    `(ids [C, N], problems [C] or None)` per step (None: pooled, every candidate scored for every
    problem)."""
    from featopt.discrete import epo as epo_module

    scored = []
    original = epo_module.swap_search

    def spy(*args, on_step=None, **kwargs):
        def record(step, state, evaluated):
            scored.append((evaluated.ids.clone(), None if evaluated.all is not None else evaluated.problems.clone()))
            on_step(step, state, evaluated)
        return original(*args, on_step=record, **kwargs)

    monkeypatch.setattr(epo_module, "swap_search", spy)
    return scored
