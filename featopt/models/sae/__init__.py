"""Sparse autoencoders: the module (relu, topk, jumprelu), training over streamed activations,
evaluation, the on-disk formats of SAELens, sparsify and Gemma Scope, and SAE latents as the
features of every method (`attach`)."""

from featopt.models.sae.model import ARCHITECTURES, SAEConfig, SparseAutoencoder

__all__ = ["ARCHITECTURES", "SAEConfig", "SparseAutoencoder"]
