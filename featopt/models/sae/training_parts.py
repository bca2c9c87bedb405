"""What training needs of an SAE, beside its maps: the loss, the start, and the steps that keep
its weights in shape (unit decoder rows, thresholds). :class:`~featopt.models.sae.model.SparseAutoencoder`
inherits it; an architecture overrides what its training does differently."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossTerms:
    """What a training loss weighs besides the reconstruction (`featopt sae train`'s settings)."""

    l1: float = 0.0  # relu: sparsity coefficient, on the scale of a fraction of variance
    auxk_alpha: float = 0.0  # topk: weight of the AuxK loss on dead latents
    l0_coef: float = 0.0  # jumprelu: weight of the L0 penalty
    bandwidth: float = 0.05  # jumprelu: width of the straight-through estimator's rectangle kernel
    dead: Tensor | None = None  # [d_sae] bool: latents unseen for --dead_tokens tokens
    count: bool = True  # count L0 (a logging step); a loss may skip the pass otherwise


class TrainingParts:
    """Mixed into the SAE module; reads its weights (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `W_skip`) and `cfg`."""

    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms, y: Tensor | None = None) -> tuple[Tensor, dict]:
        """The training loss on rows `x [n, d_in]` (not requiring grad) against targets `y [n, d_out]`
        (None: `x`, an SAE), a sum over rows divided by the global batch's total variance of the
        targets `total_var`, and its statistics: `fvu` (the summed squared error), `l0` (nonzero
        latents, float64) and `fired` (`[d_sae]` bool). Here: the squared error plus
        :meth:`sparsity_penalty`."""
        y = x if y is None else y
        z = self.activate(self.training_pre_acts(x))
        x_hat = self.decode(z) + self.skip_out(x)
        sq = (y - x_hat).pow(2).sum()
        loss = sq / total_var
        penalty = self.sparsity_penalty(z, terms)
        if penalty is not None:
            loss = loss + penalty / total_var
        return loss, {"fvu": sq.detach(), "l0": (z > 0).sum().detach().double(), "fired": (z > 0).any(0)}

    def sparsity_penalty(self, z: Tensor, terms: LossTerms) -> Tensor | None:
        """A penalty on the latents `z [n, d_sae]` (summed over rows) added to the squared error; None: none."""
        return None

    def after_step(self) -> None:
        """Called after each optimizer step (jumprelu keeps its thresholds at 0 or above)."""

    def observe_batch(self, stats: dict, reduce) -> None:
        """Called after each step's losses with their `stats` (`stats["steps"]`: the run's planned
        optimizer steps) and `reduce(tensor, op)` (op "sum" or "min" over ranks): batchtopk moves its
        inference threshold here."""

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, data_mean: Tensor | None = None,
                     input_mean: Tensor | None = None) -> None:
        """A training start: random unit-norm decoder rows, encoder = decoder transposed (as
        sparsify and SAELens do), zero encoder bias, decoder bias at the data mean when given.

        A transcoder (sparsify's rule): unit-norm random encoder columns, a zero decoder (its rows
        are learned from nothing, in the target's space), the encoder bias centring the
        pre-activations on the input mean `input_mean`, `b_dec` at the target mean `data_mean`."""
        W = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean if data_mean is not None else torch.zeros(self.d_out))
        if self.is_transcoder:
            self.W_dec.zero_()
            if input_mean is not None:
                self.b_enc.copy_(-input_mean @ self.W_enc)
            if self.cfg.skip:
                self.W_skip.zero_()
        else:
            self.W_dec.copy_(W)

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
        W, grad = self.W_dec, self.W_dec.grad
        # per row <grad, w> / <w, w>, then grad -= that * w in place (no [d_sae, d_in] temporaries)
        along = torch.linalg.vecdot(grad, W) / torch.linalg.vecdot(W, W).clamp_min(1e-16)
        grad.addcmul_(W, along[:, None], value=-1)

    @torch.no_grad()
    def fold_scale(self, scale: float, scale_out: float | None = None) -> None:
        """Fold an input scaling into the weights: an SAE trained on `scale * x` (a transcoder: to
        map it to `scale_out * y`) becomes one that reads raw `x` and reconstructs raw `x` (`y`),
        pre-activations, hence latents, unchanged."""
        scale_out = scale if scale_out is None else scale_out
        self.W_enc *= scale
        self.b_dec /= scale_out
        self.W_dec /= scale_out
        if self.cfg.skip:
            self.W_skip *= scale / scale_out
