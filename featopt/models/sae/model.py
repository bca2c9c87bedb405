"""The sparse autoencoder: `encode(x) -> z`, `decode(z) -> x_hat`, three architectures.

Weights follow SAELens' layout and names, so its files load without reshaping:
`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold
[d_sae]` for jumprelu. The encoder reads `x - b_dec` (the standard centring, SAELens'
`apply_b_dec_to_input`):

- `relu`: `z = relu((x - b_dec) W_enc + b_enc)` (trained with an L1 penalty; document 002's kind);
- `topk`: the k largest pre-activations kept (then relu), all others zero;
- `jumprelu`: `z = relu(pre) * (pre > threshold)` (Gemma Scope, document 003).

`decode(z) = z W_dec + b_dec`. The SAE also works as a *feature map* for
`ModelAdapter.with_features`: it maps a site's activation `[..., d_in]` to latents `[..., d_sae]`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from featopt.errors import FeatoptError

ARCHITECTURES = ("relu", "topk", "jumprelu")


@dataclass
class SAEConfig:
    """What an SAE is, independent of how it was trained (saved as SAELens' `cfg.json`)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None  # topk only
    hook_name: str = ""  # the site it reads, featopt's or TransformerLens' spelling
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)  # training settings, provenance

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise FeatoptError(f"unknown SAE architecture {self.architecture!r}: allowed are {', '.join(ARCHITECTURES)}.")
        if self.d_in < 1 or self.d_sae < 1:
            raise FeatoptError(f"an SAE needs d_in and d_sae of at least 1, got d_in={self.d_in}, d_sae={self.d_sae}.")
        if self.architecture == "topk":
            if self.k is None or not 1 <= self.k <= self.d_sae:
                raise FeatoptError(f"a topk SAE needs k between 1 and d_sae = {self.d_sae}, got k={self.k}.")


class SparseAutoencoder(nn.Module):
    """An SAE over `d_in`-wide activations with `d_sae` latents.

    Shapes: `x [..., d_in]`, `z [..., d_sae]`. Parameters are created zero (or from `init`); use
    :meth:`init_weights` for a training start.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.source: str | None = None  # where it was loaded from, for records
        self._hash: str | None = None

    # ----------------------------------------------------------------- sizes
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def width(self) -> int:
        """Number of features it exposes as a feature map: its latents."""
        return self.cfg.d_sae

    # ----------------------------------------------------------------- the maps
    def pre_acts(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> pre-activations `[..., d_sae]`."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Pre-activations `[..., d_sae]` -> latents `[..., d_sae]` by the architecture's rule."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        # relu too, as SAELens and Gemma Scope do: a negative threshold must not pass negative values.
        return torch.relu(pre) * (pre > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> latents `z [..., d_sae]`."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: Tensor) -> Tensor:
        """Latents `z [..., d_sae]` -> reconstruction `x_hat [..., d_in]`."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> `x_hat [..., d_in]`."""
        return self.decode(self.encode(x))

    def features(self, acts: Tensor) -> Tensor:
        """The feature-map face: a site's activation `[..., d_in]` -> latents `[..., d_sae]`,
        returned in the activation's dtype."""
        return self.encode(acts).to(acts.dtype)

    # ----------------------------------------------------------------- training helpers
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, data_mean: Tensor | None = None) -> None:
        """A training start: random unit-norm decoder rows, encoder = decoder transposed (as
        sparsify and SAELens do), zero encoder bias, decoder bias at the data mean when given."""
        W = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean if data_mean is not None else torch.zeros(self.d_in))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows back to unit norm (relu and topk keep them so)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row, so a step does not just grow rows
        that :meth:`normalize_decoder` would shrink back."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec / self.W_dec.norm(dim=1, keepdim=True).pow(2).clamp_min(1e-16)

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        """Fold an input scaling into the weights: an SAE trained on `scale * x` becomes one that
        reads raw `x` and reconstructs raw `x` (pre-activations, hence latents, unchanged)."""
        self.W_enc *= scale
        self.b_dec /= scale
        self.W_dec /= scale

    # ----------------------------------------------------------------- identity
    def content_hash(self) -> str:
        """sha256 of the config and weights (16 hex digits): records name the SAE they used."""
        digest = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        """What this SAE is, for the records of every method that targets its latents. The hash
        is computed once: an SAE used as a feature map is frozen."""
        if self._hash is None:
            self._hash = self.content_hash()
        return {"kind": "sae", "path": self.source, "sha256": self._hash, "architecture": self.cfg.architecture,
                "hook_name": self.cfg.hook_name, "d_in": self.d_in, "d_sae": self.d_sae, "k": self.cfg.k}

    def pre_activation_map(self) -> "PreActivations":
        """This SAE's encoder pre-activations as a feature map (see :class:`PreActivations`)."""
        return PreActivations(self)

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.architecture == "topk" else ""
        return f"{self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, hook={self.cfg.hook_name!r}"


class PreActivations:
    """An SAE's encoder pre-activations `[..., d_sae]` as a feature map.

    Gradient methods get no gradient from a latent that is off (a topk latent outside the k
    largest, a relu latent below zero), and at a random start nearly every latent is off. Its
    pre-activation is the same linear read-out without the cut, equal to the latent wherever the
    latent fires (relu, and topk within the k largest), so ascent on it climbs towards inputs
    that fire the latent; the found inputs are then re-measured on the latent itself.
    """

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        self.d_in, self.width = sae.d_in, sae.d_sae

    def features(self, acts: Tensor) -> Tensor:
        return self.sae.pre_acts(acts).to(acts.dtype)

    def describe(self) -> dict:
        return {**self.sae.describe(), "readout": "pre-activation"}
