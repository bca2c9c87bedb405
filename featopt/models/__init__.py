"""Models: the only package that knows a model's internals.

`load_model("tiny-gpt2")`, `load_model("smollm2-135m-instruct")` (found under
`FEATOPT_MODEL_PATH`), a local folder, a `.gguf` file or a hub id give a :class:`ModelAdapter`.
"""

from __future__ import annotations

import torch

from featopt.models.adapter import ModelAdapter
from featopt.models.sites import SITE_KINDS, Site, parse_site

__all__ = ["ModelAdapter", "Site", "SITE_KINDS", "parse_site", "load_model"]


def load_model(
    name: str, *, untrained: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ModelAdapter:
    """Load a causal LM by name and wrap it. `untrained=True` re-initializes it from its own
    config under `seed` (the documents compare trained and untrained models)."""
    from featopt.models import loading

    loaded = loading.load_model(name, untrained=untrained, seed=seed, dtype=dtype, device=device)
    label = f"{name} (untrained, seed {seed})" if untrained else name
    return ModelAdapter(loaded.model, loaded.tokenizer, name=label, info=loaded)
