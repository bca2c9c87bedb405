"""featopt: find the inputs that make a feature of a language model fire, and check what they do.

The commands of the `featopt` command line are functions here, with the same names, settings and
defaults; each returns a result object that prints the command's table and renders in Jupyter:

    import featopt
    featopt.optimize(model="smollm2-135m-instruct", layer=0, features="[:, :, 0-4]")
    featopt.search.exhaustive(model="smollm2-135m-instruct", layer=8, features="[:, :, 0-31]")
    featopt.search.gcg("l1_target(C=100) - 0.5 * maximize(features='[:, :, 3]')", tokens=8)
    featopt.sae.train(...); featopt.sae.dashboard(...); featopt.flow.match(...); featopt.neurons.decode(...); featopt.graph.build(...)

They are loaded on first use, so `import featopt` stays quick; objectives are values in
`featopt.objectives`, models are loaded by `featopt.models.load_model`.
"""

from featopt.version import __version__

_COMMANDS = {"optimize": "optimize", "invert": "invert", "compare": "compare", "align": "align", "demo": "demo"}
_NAMESPACES = ("search", "neurons", "sae", "flow", "graph")

__all__ = ["__version__", *_COMMANDS, *_NAMESPACES]


def __getattr__(name: str):
    import importlib

    if name in _COMMANDS:
        from featopt.api import function

        value = function(_COMMANDS[name])
    elif name in _NAMESPACES:
        value = importlib.import_module(f"featopt.{name}")
    else:
        raise AttributeError(f"module 'featopt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
