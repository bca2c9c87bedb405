"""Where featopt keeps what is expensive to recompute (converted GGUF models, pseudoinverses)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$FEATOPT_CACHE`, default `~/.cache/featopt`."""
    return Path(os.environ.get("FEATOPT_CACHE") or "~/.cache/featopt").expanduser()
