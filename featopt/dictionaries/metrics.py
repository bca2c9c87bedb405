"""The metrics of an SAE's reconstruction, sparsity, next-token loss and KL divergence, as
:class:`torchmetrics.Metric`s.

They accumulate over batches, and every state is a sum (`dist_reduce_fx="sum"`), so a run split
over DDP ranks (each rank evaluating its own contexts) gets the metrics of all tokens on every
rank at `compute()`. Rows are tokens: `x [N, d]` the activations reconstructed (an SAE's input, a
transcoder's target), `x_hat [N, d]` the reconstruction, `z [N, d_sae]` the latents. :func:`featopt.dictionaries.evaluate.evaluate`
runs them for several SAEs over a corpus. The latent metrics also take the latents sparsely
(`update_sparse`): the COO nonzeros `(rows, cols, values)` `[nnz]` of `z [n, d_sae]` (what
`featopt.models.sae.wide.encode_sparse` gives for a dictionary too wide to encode densely), with
the same states as `update(z)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from featopt.errors import FeatoptError


def _rows(x: Tensor) -> Tensor:
    """`[..., w]` -> `[rows, w]`, detached, float32 at least (sums are taken in float64)."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


#: Latents `z [n_rows, d_sae]` as their COO nonzeros: `(rows [nnz], cols [nnz], values [nnz], n_rows)`.
#: `update_sparse` passes them to `update(sparse=...)`, not to its own code: torchmetrics wraps
#: `update` only, which counts updates and drops the cached result of `compute`.
_Sparse = tuple[Tensor, Tensor, Tensor, int]


def _check_sparse(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> None:
    if not (rows.dim() == cols.dim() == values.dim() == 1 and len(rows) == len(cols) == len(values)):
        raise FeatoptError(f"sparse latents need rows, cols and values of one length [nnz], got shapes "
                           f"{tuple(rows.shape)}, {tuple(cols.shape)} and {tuple(values.shape)}.")
    if n_rows < 0:
        raise FeatoptError(f"the number of rows (tokens) of sparse latents must be 0 or more, got {n_rows}.")


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise FeatoptError(f"activations {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape.")


class _Base(Metric):
    is_differentiable, full_state_update = False, False

    def __init__(self, **kwargs):
        # featopt evaluates in one process (rank 0 alone during a multi-process training run's held-out
        # evaluations): a metric must never wait to sync with ranks that are not evaluating
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)

    def _add_sum(self, name: str, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> None:
        self.add_state(name, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")


class ReconstructionMSE(_Base):
    """Squared reconstruction error `||x - x_hat||^2` summed over `d_in`, mean over tokens
    (`per_element=True`: mean over tokens and `d_in`, i.e. the former divided by `d_in`)."""

    higher_is_better = False

    def __init__(self, per_element: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.per_element = per_element
        self._add_sum("sum_sq")
        self._add_sum("tokens", dtype=torch.long)
        self._add_sum("elements", dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        _check_pair(x, x_hat)
        x, x_hat = _rows(x), _rows(x_hat)
        self.sum_sq += (x - x_hat).pow(2).sum(-1).sum(dtype=torch.float64)
        self.tokens += x.shape[0]
        self.elements += x.numel()

    def compute(self) -> Tensor:
        return self.sum_sq / (self.elements if self.per_element else self.tokens)


class FractionVarianceUnexplained(_Base):
    """FVU: `sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`, both sums over every token seen and
    `mean(x)` their global mean (per dimension): the states are `sum x`, `sum x^2` per dimension
    and the token count, so batches and ranks combine exactly. Lower is better; 0 is perfect."""

    higher_is_better = False

    def __init__(self, d_in: int, **kwargs):
        super().__init__(**kwargs)
        self.d_in = d_in
        self._add_sum("sum_sq_err")
        self._add_sum("sum_x", (d_in,))
        self._add_sum("sum_x2", (d_in,))
        self._add_sum("tokens", dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        _check_pair(x, x_hat)
        if x.shape[-1] != self.d_in:
            raise FeatoptError(f"activations are {x.shape[-1]} wide but this metric was made for d_in = {self.d_in}.")
        x, x_hat = _rows(x), _rows(x_hat)
        self.sum_sq_err += (x - x_hat).pow(2).sum(-1).sum(dtype=torch.float64)
        x = x.double()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    def compute(self) -> Tensor:
        # sum_t ||x_t - mean||^2 = sum x^2 - (sum x)^2 / n, per dimension, then over dimensions.
        total = (self.sum_x2 - self.sum_x.pow(2) / self.tokens).sum()
        return self.sum_sq_err / total


class ExplainedVariance(FractionVarianceUnexplained):
    """`1 - FVU` (pooled over dimensions; not torchmetrics' per-output `ExplainedVariance`,
    which subtracts the residuals' mean)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return 1.0 - super().compute()


class MeanL0(_Base):
    """Mean number of latents `> 0` per token."""

    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._add_sum("active", dtype=torch.long)
        self._add_sum("tokens", dtype=torch.long)

    def update(self, z: Tensor | None = None, *, sparse: _Sparse | None = None) -> None:
        """`z [..., d_sae]`, or `sparse` (see :meth:`update_sparse`)."""
        if sparse is not None:
            rows, cols, values, n_rows = sparse
            _check_sparse(rows, cols, values, n_rows)
            self.active += (values.detach() > 0).sum()  # every latent > 0 is among the nonzeros
            self.tokens += n_rows
            return
        z = z.detach().reshape(-1, z.shape[-1])
        self.active += (z > 0).sum()
        self.tokens += z.shape[0]

    def update_sparse(self, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> None:
        """`update(z)` of `z [n_rows, d_sae]` given as its nonzeros `(rows, cols, values)` `[nnz]`,
        each cell once."""
        self.update(sparse=(rows, cols, values, n_rows))  # through torchmetrics' wrapped update: see _Sparse

    def compute(self) -> Tensor:
        return self.active.double() / self.tokens


class FiringFrequency(_Base):
    """Per latent, the fraction of tokens on which it is `> 0`: `[d_sae]`."""

    higher_is_better = None

    def __init__(self, d_sae: int, **kwargs):
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self._add_sum("fired", (d_sae,), dtype=torch.long)
        self._add_sum("tokens", dtype=torch.long)

    def update(self, z: Tensor | None = None, *, sparse: _Sparse | None = None) -> None:
        """`z [..., d_sae]`, or `sparse` (see :meth:`update_sparse`)."""
        if sparse is not None:
            rows, cols, values, n_rows = sparse
            _check_sparse(rows, cols, values, n_rows)
            fired = cols[values.detach() > 0]  # each cell once: a latent's entries count its tokens
            if len(fired) and (int(fired.min()) < 0 or int(fired.max()) >= self.d_sae):
                raise FeatoptError(f"sparse latents name latents {int(fired.min())}-{int(fired.max())} but this "
                                   f"metric was made for d_sae = {self.d_sae} (latents 0-{self.d_sae - 1}).")
            self.fired += torch.bincount(fired, minlength=self.d_sae).to(self.fired.device)
            self.tokens += n_rows
            return
        if z.shape[-1] != self.d_sae:
            raise FeatoptError(f"latents are {z.shape[-1]} wide but this metric was made for d_sae = {self.d_sae}.")
        z = z.detach().reshape(-1, z.shape[-1])
        self.fired += (z > 0).sum(0)
        self.tokens += z.shape[0]

    def update_sparse(self, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> None:
        """`update(z)` of `z [n_rows, d_sae]` given as its nonzeros `(rows, cols, values)` `[nnz]`,
        each cell once."""
        self.update(sparse=(rows, cols, values, n_rows))  # through torchmetrics' wrapped update: see _Sparse

    def compute(self) -> Tensor:
        return self.fired.double() / self.tokens


class DeadFraction(FiringFrequency):
    """Fraction of latents that never fired (never `> 0`) on any token seen."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return (self.fired == 0).double().mean()


class _OverPredictions(_Base):
    """A mean over the next-token predictions made at positions `skip_first .. T-2` (position t
    predicts token t+1) of contexts of T tokens: what the CE and the KL share."""

    higher_is_better = False

    def __init__(self, skip_first: int = 1, **kwargs):
        super().__init__(**kwargs)
        if skip_first < 0:
            raise FeatoptError(f"skip_first must be 0 or more, got {skip_first}.")
        self.skip_first = skip_first
        self._add_sum("predictions", dtype=torch.long)

    def _check_length(self, tokens: int) -> None:
        if tokens - 1 <= self.skip_first:
            raise FeatoptError(f"contexts of {tokens} tokens leave no prediction after skipping {self.skip_first} positions.")


class MeanCrossEntropy(_OverPredictions):
    """Mean next-token cross-entropy (nats) of `logits [B, T, V]` for `ids [B, T]`, over the
    predictions made at positions `skip_first .. T-2` (position t predicts token t+1)."""

    def __init__(self, skip_first: int = 1, **kwargs):
        super().__init__(skip_first, **kwargs)
        self._add_sum("sum_nll")

    def update(self, logits: Tensor, ids: Tensor) -> None:
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise FeatoptError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}: expected [B, T, V] and [B, T].")
        self._check_length(ids.shape[1])
        s = self.skip_first
        targets = ids[:, s + 1:].to(logits.device)
        # One context at a time: a float32 copy of [B, T, V] logits can be large (V ~ 50k).
        for row_logits, row_targets in zip(logits[:, s:-1], targets):
            nll = F.cross_entropy(row_logits.float(), row_targets, reduction="sum")
            self.sum_nll += nll.to(torch.float64)
        self.predictions += targets.numel()

    def compute(self) -> Tensor:
        return self.sum_nll / self.predictions


class MeanKLDivergence(_OverPredictions):
    """Mean KL divergence `KL(p_clean || p)` (nats) of the next-token distributions of `logits`
    against those of `clean` (both `[B, T, V]`), over the same predictions as
    :class:`MeanCrossEntropy`: positions `skip_first .. T-2`. 0 when the distributions agree."""

    def __init__(self, skip_first: int = 1, **kwargs):
        super().__init__(skip_first, **kwargs)
        self._add_sum("sum_kl")

    def update(self, clean: Tensor, logits: Tensor) -> None:
        if logits.dim() != 3 or clean.shape != logits.shape:
            raise FeatoptError(f"logits {tuple(logits.shape)} do not match the clean logits {tuple(clean.shape)}: "
                               f"expected both [B, T, V].")
        self._check_length(logits.shape[1])
        s = self.skip_first
        # One context at a time, in float32 (as the CE): sum_v p log(p / q) with p the clean distribution.
        for p_logits, q_logits in zip(clean[:, s:-1], logits[:, s:-1]):
            log_p = torch.log_softmax(p_logits.float(), -1)
            log_q = torch.log_softmax(q_logits.to(log_p.device).float(), -1)
            self.sum_kl += F.kl_div(log_q, log_p, reduction="sum", log_target=True).to(torch.float64)
        self.predictions += logits.shape[0] * (logits.shape[1] - 1 - s)

    def compute(self) -> Tensor:
        return self.sum_kl / self.predictions


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """`(CE_zero - CE_sae) / (CE_zero - CE_clean)`: nan where ablating the site changes nothing."""
    denominator = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denominator if denominator != 0 else math.nan
