"""The topk SAE: the k largest pre-activations kept (then relu), all others zero (OpenAI's and
sparsify's kind; sparsify's SAEs are these exactly).

Training decodes the k kept latents of each row with one `embedding_bag` over k decoder rows
instead of a dense `[n, d_sae]` matmul, and adds AuxK: the latents dead for `--dead_tokens`
tokens reconstruct the residual with their top `d_in / 2` pre-activations, weighted by
`auxk_alpha` (OpenAI's and sparsify's recipe), so that dead latents get a gradient.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.sae.model import LossTerms, SAEConfig, SparseAutoencoder, register


@register("topk")
class TopKSAE(SparseAutoencoder):
    settings = ("k",)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise FeatoptError(f"a topk SAE needs k between 1 and d_sae = {cfg.d_sae}, got k={cfg.k}.")

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

    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms) -> tuple[Tensor, dict]:
        pre = self.training_pre_acts(x)
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values, indices = torch.relu(top.values), top.indices
        # The decoder reads k rows per token instead of a dense [n, d_sae] matmul.
        x_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum") + self.b_dec
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[indices[values > 0]] = True
        e = x - x_hat
        sq = e.pow(2).sum()
        loss = sq / total_var
        stats = {"fvu": sq.detach(), "l0": (values > 0).sum().detach().double(), "fired": fired}
        dead = terms.dead
        if terms.auxk_alpha > 0 and dead is not None and bool(dead.any()):
            k_aux = min(x.shape[-1] // 2, int(dead.sum()))
            scale = min(int(dead.sum()) / (x.shape[-1] // 2), 1.0)
            aux = torch.where(dead[None], pre, torch.full_like(pre, -torch.inf)).topk(k_aux, dim=-1, sorted=False)
            e_hat = F.embedding_bag(aux.indices, self.W_dec, per_sample_weights=torch.relu(aux.values).to(self.W_dec.dtype),
                                    mode="sum")
            loss = loss + terms.auxk_alpha * scale * (e_hat - e.detach()).pow(2).sum() / total_var
        return loss, stats
