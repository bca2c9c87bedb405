"""`featopt graph ...` as Python functions (attribution graphs over per-layer transcoders: build,
intervene, view). Same names, settings and defaults as the command line (see `featopt.api`); each
returns its result object. The library itself is `featopt.attribution`."""

from featopt.api import function

build = function("graph build")
intervene = function("graph intervene")
view = function("graph view")

__all__ = ["build", "intervene", "view"]
