"""The Matryoshka BatchTopK SAE (Bussmann et al. 2025, Nabeshima 2024; SAELens'
`matryoshka_batchtopk`): nested prefixes of the dictionary, `widths = (w_1 < w_2 < ... < d_sae)`,
each trained to reconstruct the target on its own, so the first latents learn general features
and later ones refine them instead of absorbing them (less feature absorption). The loss is the
sum over prefixes of `||y - b_dec - sum_{kept i < w} z_i W_dec[i]||^2 / total_var`, the latents
kept by BatchTopK over the whole dictionary. Inference, threshold and saving are BatchTopK's.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.sae.batchtopk import BatchTopKSAE
from featopt.models.sae.model import SAEConfig, register
from featopt.models.sae.sparse_step import KeptPairs, decode_pairs, squared_error


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    saelens_name = "jumprelu"
    settings = ("k", "matryoshka")

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        widths = cfg.matryoshka
        if not widths or list(widths) != sorted(set(widths)) or widths[0] < 1 or widths[-1] != cfg.d_sae:
            raise FeatoptError(f"a matryoshka SAE needs increasing prefix sizes ending at d_sae = {cfg.d_sae}, "
                               f"got {list(widths) if widths else widths}.")

    @classmethod
    def config_from_saelens(cls, doc: dict, where: Path) -> dict:
        return {}

    def label(self) -> str:
        return f"-k{self.cfg.k}-m{'.'.join(str(w) for w in self.cfg.matryoshka)}"

    def reconstruction_error(self, y: Tensor, pairs: KeptPairs, values: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start, recon, sq = 0, None, 0.0
        for width in self.cfg.matryoshka:
            # each prefix adds the decoder rows of its own latents only: one decode over all pairs in all
            inside = (pairs.cols >= start) & (pairs.cols < width)
            part = decode_pairs(pairs.subset(inside), values[inside], self.W_dec)
            recon = part if recon is None else recon + part
            e_sq, e = squared_error(y, recon, base)
            sq = sq + e_sq
            start = width
        return sq, e, e_sq
