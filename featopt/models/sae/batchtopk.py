"""The BatchTopK SAE (Bussmann et al. 2024; SAELens' `batchtopk`): training keeps the `n * k`
largest pre-activations of the whole batch of `n` rows (so k latents per row on average, more on
rich rows, fewer on plain ones) instead of k per row. A rule over the batch cannot encode one row,
so inference is JumpReLU with one learned threshold for every latent: the running average of the
smallest kept activation, as SAELens does, but started at the first batch's value rather than at 0
(SAELens' start at 0 leaves it at half its level after 70 steps), and at rate `max(0.01, 10 /
steps)` rather than SAELens' 0.01: the average spans at most the last tenth of the run. The kept
minimum falls while training (1.45 to 0.62 over a 74-step run on SmolLM2), so at 0.01 the
threshold lagged at 1.13 and the inference L0 was 14 for k = 32; at 10 / steps it is 30.5. It is saved as SAELens saves it,
as a `jumprelu` SAE whose `threshold [d_sae]` holds that value; featopt's metadata keeps the
architecture and k, so featopt loads it back as a batchtopk SAE and sae-lens as a jumprelu one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featopt.models.sae.model import SAEConfig, register
from featopt.models.sae.selection import batch_topk_pairs
from featopt.models.sae.sparse_step import KeptPairs
from featopt.models.sae.topk import TopKSAE

#: how fast the inference threshold follows each batch's smallest kept activation (SAELens' topk_threshold_lr) ...
THRESHOLD_RATE = 0.01
#: ... or faster in short runs: the average then spans this fraction of the planned steps
THRESHOLD_SPAN = 0.1


def threshold_rate(steps: int | None) -> float:
    """The running average's rate for a run of `steps` optimizer steps (None: unknown), at most 1."""
    return min(1.0, max(THRESHOLD_RATE, 1.0 / (THRESHOLD_SPAN * steps))) if steps else THRESHOLD_RATE


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    #: each latent is its pre-activation where that is above `max(firing_bar, 0)`, else 0 (`sae.wide`)
    keeps_pre = True
    saelens_name = "jumprelu"
    saved_names = TopKSAE.saved_names + ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # learned by the running average below, not by gradient: kept out of the optimizer
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=False)

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def firing_bar(self, pre: Tensor) -> Tensor:
        return self.threshold.to(pre.dtype)

    def activate_columns(self, pre: Tensor, start: int) -> Tensor:
        """`activate` of the latents `start .. start + c` alone (`pre [..., c]`; `sae.wide`)."""
        return torch.relu(pre) * (pre > self.threshold[start:start + pre.shape[-1]])

    def firing_bar_columns(self, pre: Tensor, start: int) -> Tensor:
        """`firing_bar` of the latents `start .. start + c` alone (`pre [..., c]`)."""
        return self.threshold[start:start + pre.shape[-1]].to(pre.dtype)

    def saelens_fields(self) -> dict:
        return {}

    @classmethod
    def config_from_saelens(cls, doc, where) -> dict:
        return {}

    def kept_pairs(self, pre: Tensor) -> KeptPairs:
        rows, cols, values = batch_topk_pairs(pre, self.cfg.k)
        return KeptPairs(rows, cols, *pre.shape, values)

    @torch.no_grad()
    def observe_batch(self, stats: dict, reduce) -> None:
        values = stats["values"]
        positive = values[values > 0]
        smallest = positive.min() if len(positive) else values.new_tensor(float("inf"))
        smallest = reduce(smallest.float(), "min")  # over ranks: every rank keeps the same threshold
        if not torch.isfinite(smallest):
            return
        if not self.threshold.any():  # the first batch: start at its value, not at 0 (an average of few
            self.threshold.fill_(float(smallest))  # batches would otherwise stay far below the kept values)
        else:
            rate = threshold_rate(stats.get("steps"))
            self.threshold.lerp_(smallest.to(self.threshold.dtype).expand_as(self.threshold), rate)
