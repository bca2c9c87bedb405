"""The topk SAE: the k largest pre-activations kept (then relu), all others zero (OpenAI's and
sparsify's kind; sparsify's SAEs are these exactly).

Training runs over the kept latents only (:mod:`featopt.models.sae.sparse_step`: the encoder's
gradient and the decoder over the `n * k` kept pairs, not the dense `[n, d_sae]`), and adds AuxK:
the latents dead for `--dead_tokens` tokens reconstruct the residual with their top `d_out / 2`
pre-activations, weighted by `auxk_alpha` (OpenAI's and sparsify's recipe), so that dead latents
get a gradient. Subclasses change which pairs are kept (:meth:`TopKSAE.kept_pairs`) and how the
reconstruction is scored (:meth:`TopKSAE.reconstruction_error`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.sae.model import SAEConfig, SparseAutoencoder, register
from featopt.models.sae.training_parts import LossTerms
from featopt.models.sae.selection import row_topk_pairs
from featopt.models.sae.sparse_step import KeptPairs, auxk_loss, decode_pairs, gather_pre, preacts_buffer, squared_error


@register("topk")
class TopKSAE(SparseAutoencoder):
    settings = ("k",)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise FeatoptError(f"a {cls.name} SAE needs k between 1 and d_sae = {cfg.d_sae}, got k={cfg.k}.")

    def activate(self, pre: Tensor) -> Tensor:
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def firing_bar(self, pre: Tensor) -> Tensor:
        # The k-th largest pre-activation: a latent below it is outside the top k (ties aside).
        return pre.topk(self.cfg.k, dim=-1).values[..., -1:]

    def saelens_fields(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def config_from_saelens(cls, doc: dict, where: Path) -> dict:
        k = doc.get("k")
        if isinstance(k, bool) or not isinstance(k, int):
            raise FeatoptError(f"{where} needs an integer 'k', got {k!r}.")
        return {"k": k}

    # ----------------------------------------------------------------- training
    def kept_pairs(self, pre: Tensor) -> KeptPairs:
        """The latents training keeps, rows ascending: each row's k largest."""
        rows, cols, values = row_topk_pairs(pre, self.cfg.k)
        return KeptPairs(rows, cols, *pre.shape, values)

    def reconstruction_error(self, y: Tensor, pairs: KeptPairs, values: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(summed squared error of the loss, the residual [n, d_out], its summed square)` of targets
        `y` reconstructed from the kept pairs' `values` on top of `base` (`b_dec` plus any skip
        connection)."""
        sq, e = squared_error(y, decode_pairs(pairs, values, self.W_dec), base)
        return sq, e, sq

    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms, y: Tensor | None = None) -> tuple[Tensor, dict]:
        y = x if y is None else y
        x = x.to(self.W_enc.dtype)
        c = self.training_bias()
        with torch.no_grad():  # the dense product once, without a graph; only kept pairs get one
            pre = torch.addmm(c, x, self.W_enc, out=preacts_buffer(len(x), self.d_sae, x))
        pairs = self.kept_pairs(pre)
        values = torch.relu(gather_pre(x, self.W_enc, c, pre, pairs))
        sq, e, e_sq = self.reconstruction_error(y, pairs, values, self.b_dec + self.skip_out(x))
        loss = sq / total_var
        active = values > 0
        fired = torch.bincount(pairs.cols, weights=active.to(values.dtype), minlength=self.d_sae) > 0
        stats = {"fvu": e_sq.detach(), "l0": active.sum().detach().double(), "fired": fired, "values": values.detach()}
        dead = terms.dead
        if terms.auxk_alpha > 0 and dead is not None and bool(dead.any()):
            loss = loss + terms.auxk_alpha * auxk_loss(pre, dead, e, x, self.W_enc, c, self.W_dec) / total_var
        return loss, stats
