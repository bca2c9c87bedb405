"""Sparse autoencoders: the module (one class per architecture, registered by name in
`ARCHITECTURES`), the on-disk formats of SAELens, sparsify and Gemma Scope, and SAE latents as the
features of every method (`attach`). A new architecture is one file: a subclass of
:class:`SparseAutoencoder` under `@register("name")` (see `model.py`)."""

from featopt.models.sae.model import ARCHITECTURES, LossTerms, SAEConfig, SparseAutoencoder, architecture, register

# The built-in architectures, each registering itself on import, in the order messages list them.
from featopt.models.sae.relu import ReluSAE  # noqa: E402, I001
from featopt.models.sae.topk import TopKSAE  # noqa: E402
from featopt.models.sae.jumprelu import JumpReluSAE  # noqa: E402

__all__ = ["ARCHITECTURES", "JumpReluSAE", "LossTerms", "ReluSAE", "SAEConfig", "SparseAutoencoder", "TopKSAE",
           "architecture", "register"]
