"""`featopt flow ...` as Python functions (feature flow across layers, document 003). Same names, settings and defaults as
the command line (see `featopt.api`); each returns its result object."""

from featopt.api import function

match = function("flow match")
graph = function("flow graph")
groups = function("flow groups")
transition = function("flow transition")
deactivate = function("flow deactivate")
steer = function("flow steer")

__all__ = ["match", "graph", "groups", "transition", "deactivate", "steer"]
