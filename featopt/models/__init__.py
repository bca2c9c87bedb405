"""Models: the only package that knows a model's internals.

`load_model("tiny-gpt2")`, `load_model("smollm2-135m-instruct")` (found under
`FEATOPT_MODEL_PATH`), a local folder, a `.gguf` file or a hub id give a :class:`ModelAdapter`.
"""

from __future__ import annotations

import torch

from featopt.models.adapter import ModelAdapter
from featopt.models.sites import SITE_KINDS, Site, parse_site

__all__ = ["DTYPES", "ModelAdapter", "Site", "SITE_KINDS", "dtype_of", "parse_site", "load_model", "model_options"]

#: The dtypes a model (`--dtype`) may be loaded in.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype `--dtype name` means; one sentence naming the allowed ones otherwise."""
    from featopt.errors import FeatoptError

    if name not in DTYPES:
        raise FeatoptError(f"--dtype {name!r} is not known: allowed are {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_model(
    name: str, *, untrained: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", bos: bool = False, trust_remote_code: bool = False,
    device_map: str | dict | None = None, max_memory: str | dict | None = None,
) -> ModelAdapter:
    """Load a causal LM by name and wrap it. `untrained=True` re-initializes it from its own
    config under `seed` (the documents compare trained and untrained models); `bos` starts
    every encoded text with the BOS token (`--bos`); `trust_remote_code` lets a model folder
    or hub id run its own Python code (`--trust_remote_code`; never by default); `device_map` and
    `max_memory` spread a large model over devices and the disk (`--device_map`, `--max_memory`)."""
    from featopt.models import loading

    loaded = loading.load_model(name, untrained=untrained, seed=seed, dtype=dtype, device=device,
                                trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory)
    label = f"{name} (untrained, seed {seed})" if untrained else name
    return ModelAdapter(loaded.model, loaded.tokenizer, name=label, info=loaded, bos=bos)


def model_options(config) -> dict:
    """The model-loading flags a method's config carries (`--bos`, `--trust_remote_code`), as
    keyword arguments of :func:`load_model`; absent fields mean off."""
    return {"bos": bool(getattr(config, "bos", False)),
            "trust_remote_code": bool(getattr(config, "trust_remote_code", False))}
