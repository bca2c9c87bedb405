"""featopt: find the inputs that make a feature of a language model fire."""

from featopt.version import __version__

__all__ = ["__version__"]
