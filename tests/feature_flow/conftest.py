"""Session fixtures of the flow tests: tiny-llama and a FlowSet of tiny SAEs (see flow_reference)."""

from __future__ import annotations

import pytest

from featopt.feature_flow.saes import FlowSet
from featopt.models import load_model
from tests.feature_flow.flow_reference import KEYS, make_sae


@pytest.fixture(scope="session")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def flow_set() -> FlowSet:
    return FlowSet({key: make_sae(*key) for key in KEYS})
