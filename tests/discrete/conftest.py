"""Tiny models in float64 for the search tests: the searches batch candidates differently from
the brute-force references, and float64 keeps rounding far below the gaps between candidates,
so argmax and top-k orders can be compared exactly."""

from __future__ import annotations

import pytest

from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny64():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")
