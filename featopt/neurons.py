"""`featopt neurons ...` as Python functions (MLP neurons read through the LM head, and clamped). Same names, settings and defaults as
the command line (see `featopt.api`); each returns its result object."""

from featopt.api import function

decode = function("neurons decode")
find = function("neurons find")
compare = function("neurons compare")
clamp = function("neurons clamp")

__all__ = ["decode", "find", "compare", "clamp"]
