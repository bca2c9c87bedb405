"""featopt: find the inputs that make a feature of a language model fire."""

__version__ = "0.1.0"
