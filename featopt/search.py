"""`featopt search ...` as Python functions (discrete searches over real tokens). Same names, settings and defaults as
the command line (see `featopt.api`); each returns its result object."""

from featopt.api import function

exhaustive = function("search exhaustive")
greedy = function("search greedy")
gcg = function("search gcg")
epo = function("search epo")

__all__ = ["exhaustive", "greedy", "gcg", "epo"]
