"""Sparse autoencoders: the module (one class per architecture, registered by name in
`ARCHITECTURES`), the on-disk formats of SAELens, sparsify and Gemma Scope, and SAE latents as the
features of every method (`attach`). A new architecture is one file: a subclass of
:class:`SparseAutoencoder` under `@register("name")` (see `model.py`)."""

from featopt.models.sae.model import ARCHITECTURES, SAEConfig, SparseAutoencoder, architecture, register
from featopt.models.sae.training_parts import LossTerms

# The built-in architectures, each registering itself on import, in the order messages list them.
from featopt.models.sae.relu import ReluSAE  # noqa: E402, I001
from featopt.models.sae.topk import TopKSAE  # noqa: E402
from featopt.models.sae.jumprelu import JumpReluSAE  # noqa: E402
from featopt.models.sae.batchtopk import BatchTopKSAE  # noqa: E402
from featopt.models.sae.matryoshka import MatryoshkaSAE  # noqa: E402

__all__ = ["ARCHITECTURES", "BatchTopKSAE", "JumpReluSAE", "MatryoshkaSAE", "LossTerms", "ReluSAE", "SAEConfig", "SparseAutoencoder", "TopKSAE",
           "architecture", "register"]
