"""`featopt sae ...` as Python functions (sparse autoencoders: train, cache, evaluate, read latents).
Same names, settings and defaults as the command line (see `featopt.api`); each returns its
result object. `sae eval` is `evaluate` here too."""

from featopt.api import function

train = function("sae train")
cache = function("sae cache")
evaluate = function("sae eval")
features = function("sae features")
lens = function("sae lens")
ablate = function("sae ablate")
mcs = function("sae mcs")
dashboard = function("sae dashboard")
inputs = function("sae inputs")
eval = evaluate  # noqa: A001 - the command line's name, `featopt sae eval`

__all__ = ["train", "cache", "evaluate", "features", "lens", "ablate", "mcs", "dashboard", "inputs", "eval"]
