"""Float64 tiny models for the neuron tests (see neuron_reference.py)."""

from __future__ import annotations

import pytest
from neuron_reference import tiny


@pytest.fixture(scope="module")
def llama64():
    return tiny("tiny-llama")


@pytest.fixture(scope="module")
def gpt64():
    return tiny("tiny-gpt2")
