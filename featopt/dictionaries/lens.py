"""Logit lens of SAE decoder directions (source document 002, "Logit Lens").

A latent's decoder row `W_dec[i] [d_in]` is a direction in the residual stream; unembedding it
gives `[V]` logits: the tokens it promotes (top) and suppresses (bottom). Document 002 first
"subtract[s] out several high norm tokens from the unembed": tokens whose unembedding rows have
outlying norms (tokens the tokenizer never emits, whose rows were never trained) dominate every
direction's logits. :func:`high_norm_tokens` is the rule that picks them; they are left out of
the top and bottom lists (and named in the record).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.weights.decode import Unembed


def high_norm_tokens(W_U: Tensor, *, z: float | None = 3.0, top: int | None = None) -> Tensor:
    """Token ids whose unembedding rows have outlying norms, ascending.

    `W_U [V, d]`. With `top`, the `top` largest row norms (it takes precedence over `z`);
    otherwise the tokens whose norm has a z-score above `z`: `(norm - mean) / std > z`, mean and
    (population) std over all `V` rows. `z=None, top=None` removes nothing. Returns `[n]` long.
    """
    if W_U.ndim != 2 or W_U.shape[0] < 1:
        raise FeatoptError(f"the unembedding must be [V, d] with V >= 1, got shape {tuple(W_U.shape)}.")
    V = W_U.shape[0]
    # float32 accumulation without a float copy of a half-precision [V, d] matrix.
    norms = torch.linalg.vector_norm(W_U.detach(), dim=1, dtype=torch.float32).double().cpu()
    if top is not None:
        if not 0 <= top <= V:
            raise FeatoptError(f"top must be between 0 and the vocabulary size {V}, got {top}.")
        return norms.topk(top).indices.sort().values
    if z is None:
        return torch.zeros(0, dtype=torch.long)
    std = norms.std(correction=0)
    if std == 0:  # all norms equal: no outlier
        return torch.zeros(0, dtype=torch.long)
    return (((norms - norms.mean()) / std) > z).nonzero().squeeze(1)


def check_latents(latents: int | Iterable[int], d_sae: int) -> list[int]:
    """Latent indices as a list, each in `[0, d_sae)`; shared by the SAE reading tools."""
    try:
        out = [operator.index(latents)]  # one index: int, numpy or 0-dim tensor
    except TypeError:
        try:
            out = [operator.index(i) for i in latents]
        except TypeError:
            raise FeatoptError(f"latents must be integer indices (one or a list), got {latents!r}.") from None
    if not out:
        raise FeatoptError("no latent given: give at least one latent index.")
    for i in out:
        if not 0 <= i < d_sae:
            raise FeatoptError(f"latent {i} is out of range: this SAE has latents 0 to {d_sae - 1}.")
    return out


@dataclass
class LogitLens:
    """Top and bottom tokens of each latent's decoder direction.

    `top_ids, top_logits [n, k]`: largest logits first; `bottom_ids, bottom_logits [n, k]`: most
    negative first. `removed [r]`: the high-norm token ids left out. `norm`: how the final norm
    was applied (see :func:`logit_lens`).
    """

    latents: list[int]
    top_ids: Tensor
    top_logits: Tensor
    bottom_ids: Tensor
    bottom_logits: Tensor
    removed: Tensor
    norm: str

    def records(self, decode: Callable[[list[int]], str]) -> list[dict]:
        """One JSON-able dict per latent; `decode` maps token ids to text (`adapter.decode`)."""
        removed = [decode([t]) for t in self.removed.tolist()]

        def pairs(ids: Tensor, logits: Tensor) -> list[list]:
            return [[decode([t]), float(v)] for t, v in zip(ids.tolist(), logits.tolist())]

        return [{"latent": latent, "norm": self.norm, "top": pairs(self.top_ids[n], self.top_logits[n]),
                 "bottom": pairs(self.bottom_ids[n], self.bottom_logits[n]), "removed": removed}
                for n, latent in enumerate(self.latents)]


@torch.inference_mode()
def logit_lens(adapter, sae, latents: int | Iterable[int], *, k: int = 10, norm: str = "weight",
               drop_z: float | None = 3.0, drop_top: int | None = None, chunk: int = 256) -> LogitLens:
    """Logit lens of `sae`'s decoder rows `W_dec[latents]` through `adapter`'s LM head.

    `norm` says how a direction passes the final norm (:class:`~featopt.weights.decode.Unembed`):
    `"none"`: the raw LM head, `W_U w`; `"weight"` (the default): the final norm's elementwise gain
    applied first, `W_U (gain * w)`: the direction as the head reads it, up to a positive scale
    (the norm's division by the RMS of the whole residual); `"apply"`: the model's final-norm
    module run on `w` as if it were a residual vector (LayerNorm also centres it and adds its bias).
    An LM-head bias, where there is one, is added. Tokens from :func:`high_norm_tokens` (`drop_z`,
    `drop_top`) never appear in the lists. Latents go `chunk` at a time, so at most
    `[chunk, V]` logits are held. Results are float32 on the CPU.
    """
    if min(k, chunk) < 1:
        raise FeatoptError(f"k and chunk must be at least 1, got k={k}, chunk={chunk}.")
    latents = check_latents(latents, sae.d_sae)
    unembed = Unembed.from_adapter(adapter, norm)
    W_U, V = unembed.weight, unembed.weight.shape[0]
    if sae.d_in != W_U.shape[1]:
        raise FeatoptError(f"the SAE's decoder rows are {sae.d_in} wide but the LM head reads {W_U.shape[1]}-wide "
                           "residuals: use an SAE trained on this model's residual stream.")
    removed = high_norm_tokens(W_U, z=drop_z, top=drop_top)
    if len(removed) >= V:
        raise FeatoptError(f"all {V} tokens were removed as high-norm: lower drop_top or raise drop_z.")
    k = min(k, V - len(removed))
    removed_dev = removed.to(W_U.device)
    out: dict[str, list[Tensor]] = {"ti": [], "tv": [], "bi": [], "bv": []}
    index = torch.tensor(latents, device=sae.W_dec.device)
    for c0 in range(0, len(latents), chunk):
        h = unembed.prepare(sae.W_dec.detach().index_select(0, index[c0:c0 + chunk]))  # [c, d]
        logits = (h @ W_U.T).float()  # [c, V]
        if unembed.bias is not None:
            logits += unembed.bias.float()
        # Removed tokens can be neither the largest nor the most negative.
        top = logits.index_fill(1, removed_dev, float("-inf")).topk(k, dim=1)
        bottom = logits.index_fill_(1, removed_dev, float("inf")).topk(k, dim=1, largest=False)
        out["ti"].append(top.indices.cpu())
        out["tv"].append(top.values.cpu())
        out["bi"].append(bottom.indices.cpu())
        out["bv"].append(bottom.values.cpu())
    return LogitLens(latents, torch.cat(out["ti"]), torch.cat(out["tv"]), torch.cat(out["bi"]),
                     torch.cat(out["bv"]), removed, norm)
