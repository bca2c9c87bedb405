"""The real trained model, loaded once for all integration tests (about 1 s from featopt's
cache, about 30 s the first time, when the GGUF file is converted)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODELS = Path(os.environ.get("FEATOPT_MODEL_PATH") or Path(__file__).resolve().parents[3] / "shared" / "models")
REAL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm():
    if not (MODELS / "smollm2-135m-instruct-q4_1-gguf").is_dir():
        pytest.skip(f"the real model is not here: no smollm2-135m-instruct-q4_1-gguf under {MODELS} "
                    "(set FEATOPT_MODEL_PATH to the shared models folder)")
    os.environ["FEATOPT_MODEL_PATH"] = str(MODELS)
    from featopt.models import load_model

    return load_model(REAL)
