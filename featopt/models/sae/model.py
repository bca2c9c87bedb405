"""The sparse autoencoder: `encode(x) -> z`, `decode(z) -> x_hat`; one class per architecture.

Weights follow SAELens' layout and names, so its files load without reshaping:
`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and whatever an
architecture adds (jumprelu's `threshold [d_sae]`). The encoder reads `x - b_dec` (the standard
centring, SAELens' `apply_b_dec_to_input`): `pre = (x - b_dec) W_enc + b_enc`, `z =
activate(pre)`, and `decode(z) = z W_dec + b_dec`.

:class:`SparseAutoencoder` holds what every architecture shares (the weights, `pre_acts`, `decode`,
the feature-map face, the training helpers, the content hash); an architecture is a subclass in a
file of its own (`relu.py`, `topk.py`, `jumprelu.py`) that gives its `activate` rule, its training
loss where the shared one does not do, and its names, and registers itself:

    @register("mine")
    class MySAE(SparseAutoencoder):
        saelens_name = "mine"  # cfg.json's "architecture"

        def activate(self, pre):
            return torch.relu(pre - 1)

`SparseAutoencoder(cfg)` builds the class registered for `cfg.architecture`, so loaders and
callers never name the classes. The SAE also works as a *feature map* for
`ModelAdapter.with_features`: it maps a site's activation `[..., d_in]` to latents `[..., d_sae]`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from featopt.errors import FeatoptError
from featopt.models.sae.training_parts import TrainingParts

#: Every architecture by featopt's name (`cfg.architecture`, `--architecture`), in registration order.
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    """Class decorator: the class is architecture `name` (what `cfg.architecture` says); its SAELens
    name is its own `saelens_name` (not one inherited from the class it extends), else `name`."""
    def add(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        cls.name = name
        cls.saelens_name = vars(cls).get("saelens_name") or name
        cls.saelens_aliases = vars(cls).get("saelens_aliases", ())
        ARCHITECTURES[name] = cls
        return cls
    return add


def architecture(name: str) -> type[SparseAutoencoder]:
    """The class of architecture `name`; one sentence naming the known ones otherwise."""
    if name not in ARCHITECTURES:
        raise FeatoptError(f"unknown SAE architecture {name!r}: allowed are {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]


@dataclass
class SAEConfig:
    """What an SAE is, independent of how it was trained (saved as SAELens' `cfg.json`)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None  # topk only
    hook_name: str = ""  # the site it reads, featopt's or TransformerLens' spelling
    # Transcoders: the site it writes (reconstructs), e.g. blocks.6.mlp_out for hook_name blocks.6.mlp_in,
    # and that site's width; "" and None: an SAE, which reconstructs its own input.
    target_hook_name: str = ""
    d_out: int | None = None
    skip: bool = False  # a linear skip connection x W_skip^T added to the output (skip transcoders)
    matryoshka: tuple[int, ...] | None = None  # matryoshka only: the nested prefix sizes, the last = d_sae
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)  # training settings, provenance

    def __post_init__(self):
        cls = architecture(self.architecture)
        if self.d_in < 1 or self.d_sae < 1:
            raise FeatoptError(f"an SAE needs d_in and d_sae of at least 1, got d_in={self.d_in}, d_sae={self.d_sae}.")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_out < 1:
            raise FeatoptError(f"a transcoder needs d_out of at least 1, got {self.d_out}.")
        if self.matryoshka is not None:
            self.matryoshka = tuple(int(w) for w in self.matryoshka)
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise FeatoptError(f"an SAE that subtracts b_dec from its input needs d_out = d_in, got d_in={self.d_in}, "
                               f"d_out={self.d_out}: set apply_b_dec_to_input to false.")
        cls.check_config(self)


#: Fields added after SAEs were first saved: left out of the content hash at their defaults, so the
#: hashes that records already carry stay valid.
_LATER_FIELDS = {"target_hook_name": "", "skip": False, "matryoshka": None}


#: Bytes of float32 hashed at a time by `content_hash`: a block of rows, not a copy of a wide SAE.
#: Big enough that a transposed view (sparsify's W_enc: each row strided over the whole file) is
#: gathered a few dozen rows per pass, not one, so the passes read each cache line about once.
_HASH_BLOCK = 1 << 26


def _update_by_rows(digest, tensor: Tensor) -> None:
    """Feed `tensor`'s values as float32, C order, to `digest`, a block of rows at a time: the same
    bytes, so the same digest, as the whole tensor's `.float().numpy().tobytes()` (which records carry)."""
    if tensor.numel() == 0:
        return
    rows = tensor.reshape(1) if tensor.dim() == 0 else tensor
    step = max(1, _HASH_BLOCK // (4 * rows[0].numel()))
    for part in rows.split(step):
        digest.update(part.cpu().float().contiguous().numpy())


class SparseAutoencoder(TrainingParts, nn.Module):
    """An SAE over `d_in`-wide activations with `d_sae` latents: the base of every architecture.

    Shapes: `x [..., d_in]`, `z [..., d_sae]`. Parameters are created zero; use
    :meth:`init_weights` for a training start.
    """

    #: featopt's name of the architecture (set by :func:`register`)
    name: ClassVar[str] = ""
    #: its name in SAELens' cfg.json ("standard" for relu); default: `name`
    saelens_name: ClassVar[str] = ""
    #: other cfg.json names read as this architecture
    saelens_aliases: ClassVar[tuple[str, ...]] = ()
    #: the tensors it saves and loads, by SAELens' names
    saved_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    #: SAEConfig fields it uses beyond the sizes (topk: "k"), taken from the `sae train` flag of the same name
    settings: ClassVar[tuple[str, ...]] = ()
    #: `featopt sae train` can train it
    trainable: ClassVar[bool] = True
    #: training keeps its decoder rows at unit norm
    unit_decoder: ClassVar[bool] = True

    def __new__(cls, cfg: SAEConfig | None = None, *args, **kwargs):
        if cls is SparseAutoencoder and cfg is not None:
            cls = architecture(cfg.architecture)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.architecture != self.name:
            raise FeatoptError(f"a {self.name} SAE needs a config of architecture {self.name!r}, got {cfg.architecture!r}.")
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))  # SAELens' and sparsify's layout: x W_skip^T
        self.source: str | None = None  # where it was loaded from, for records
        self._hash: str | None = None

    # ----------------------------------------------------------------- the architecture's parts
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise FeatoptError, one sentence, when `cfg` does not describe an SAE of this architecture."""

    def activate(self, pre: Tensor) -> Tensor:
        """Pre-activations `[..., d_sae]` -> latents `[..., d_sae]` by the architecture's rule."""
        raise NotImplementedError(f"the {self.name} SAE defines no activate")

    def firing_bar(self, pre: Tensor) -> Tensor:
        """The pre-activation each latent must exceed to fire, `[..., d_sae]` (or broadcastable to
        it) for pre-activations `pre [..., d_sae]`: 0 for relu; see :meth:`firing_score`."""
        return pre.new_zeros(())

    def saelens_fields(self) -> dict:
        """What this architecture adds to SAELens' cfg.json (topk: its k)."""
        return {}

    @classmethod
    def config_from_saelens(cls, doc: dict, where: Path) -> dict:
        """The SAEConfig fields of `settings` read from a SAELens cfg.json `doc` (at `where`)."""
        return {}

    @classmethod
    def tensors_from_saelens(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors of a SAELens file in this class' names (older sae-lens spelled some otherwise)."""
        return tensors

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors it saves and loads: its class' `saved_names`, and `W_skip` with a skip connection."""
        return type(self).saved_names + (("W_skip",) if self.cfg.skip else ())

    # ----------------------------------------------------------------- sizes
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of what it reconstructs: `d_in` for an SAE, the target site's for a transcoder."""
        return self.cfg.d_out

    @property
    def is_transcoder(self) -> bool:
        """It reconstructs another site than the one it reads (`cfg.target_hook_name`)."""
        return bool(self.cfg.target_hook_name)

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

    def training_pre_acts(self, x: Tensor) -> Tensor:
        """:meth:`pre_acts` of training rows `x [n, d_in]` that need no gradient: the centring on the
        bias (`x W_enc + b_enc - b_dec W_enc`), so that backward skips the `[n, d_in]` matmul whose
        only use would be the row sum reaching `b_dec`."""
        return torch.addmm(self.training_bias(), x.to(self.W_enc.dtype), self.W_enc)

    def training_bias(self) -> Tensor:
        """`[d_sae]`: the encoder's bias with the input centring folded in (`b_enc - b_dec W_enc`)."""
        return self.b_enc - self.b_dec @ self.W_enc if self.cfg.apply_b_dec_to_input else self.b_enc

    def skip_out(self, x: Tensor) -> Tensor | float:
        """The skip connection's part of the output, `x W_skip^T` `[..., d_out]` (0 without one)."""
        return x.to(self.W_skip.dtype) @ self.W_skip.T if self.cfg.skip else 0.0

    def encode(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> latents `z [..., d_sae]`."""
        return self.activate(self.pre_acts(x))

    def firing_score(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> `[..., d_sae]`: each latent where it fires, else how far its
        pre-activation is from firing (`pre - bar <= 0`, the bar of :meth:`firing_bar`).

        A search for inputs that fire a latent climbs this: an input that fires the latent scores
        above every input that does not, and among those that do not, the nearer ones score
        higher. For relu it is the pre-activation; for topk, a latent outside the k largest
        first climbs towards the k-th largest pre-activation (and 0), then, inside, is itself; for
        jumprelu it climbs towards its threshold, then is itself."""
        pre = self.pre_acts(x)
        z = self.activate(pre)
        return torch.where(z > 0, z, pre - torch.clamp(self.firing_bar(pre), min=0))

    def decode(self, z: Tensor) -> Tensor:
        """Latents `z [..., d_sae]` -> reconstruction `x_hat [..., d_in]`."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """`x [..., d_in]` -> the reconstruction `[..., d_out]`: `decode(encode(x))`, plus the skip
        connection's `x W_skip` where there is one (for a transcoder: its stand-in for the target site)."""
        return self.decode(self.encode(x)) + self.skip_out(x)

    def features(self, acts: Tensor) -> Tensor:
        """The feature-map face: a site's activation `[..., d_in]` -> latents `[..., d_sae]`,
        returned in the activation's dtype."""
        return self.encode(acts).to(acts.dtype)

    # ----------------------------------------------------------------- identity
    def label(self) -> str:
        """Its architecture's settings as a name part (topk: `-k32`; the others: empty)."""
        return "".join(f"-{name}{getattr(self.cfg, name)}" for name in self.settings)

    def content_hash(self) -> str:
        """sha256 of the config and weights (16 hex digits): records name the SAE they used."""
        doc = {k: v for k, v in asdict(self.cfg).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        if doc["d_out"] == doc["d_in"]:
            del doc["d_out"]
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            _update_by_rows(digest, tensor.detach())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        """What this SAE is, for the records of every method that targets its latents. The hash
        is computed once: an SAE used as a feature map is frozen."""
        if self._hash is None:
            self._hash = self.content_hash()
        return {"kind": "sae", "path": self.source, "sha256": self._hash, "architecture": self.cfg.architecture,
                "hook_name": self.cfg.hook_name, "d_in": self.d_in, "d_sae": self.d_sae, "k": self.cfg.k,
                **({"target_hook_name": self.cfg.target_hook_name, "d_out": self.d_out} if self.is_transcoder else {})}

    def pre_activation_map(self):
        """This SAE's encoder pre-activations as a feature map (see `readouts.PreActivations`)."""
        from featopt.models.sae.readouts import PreActivations

        return PreActivations(self)

    def firing_map(self):
        """This SAE's :meth:`firing_score` as a feature map (see `readouts.FiringScores`)."""
        from featopt.models.sae.readouts import FiringScores

        return FiringScores(self)

    def extra_repr(self) -> str:
        settings = "".join(f", {name}={getattr(self.cfg, name)}" for name in self.settings)
        return f"{self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{settings}, hook={self.cfg.hook_name!r}"
