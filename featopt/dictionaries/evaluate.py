"""How good an SAE is: reconstruction (MSE, FVU), sparsity (L0, dead latents) and CE loss recovered.

The metrics are :class:`torchmetrics.Metric` subclasses: they accumulate over batches, and every
state is a sum (`dist_reduce_fx="sum"`), so a run split over DDP ranks (each rank evaluating its
own contexts) gets the metrics of all tokens on every rank at `compute()`. Rows are tokens:
`x [N, d_in]` an SAE's input activations, `x_hat [N, d_in]` its reconstruction, `z [N, d_sae]`
its latents.

:func:`evaluate` runs them for several SAEs over token contexts `[N, T]`:

- one forward, stopped at the deepest SAE's site, gives every SAE's input activations;
- for the CE loss recovered, one clean forward, one forward per distinct site with the site
  zero-ablated and one per SAE with its reconstruction `decode(encode(x))` spliced in:
  `recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)` (1: as good as the model itself,
  0: no better than deleting the site).

Leading positions (`skip_first`, default 1) are left out everywhere: their activations count in
no metric, the splice and the ablation leave them unchanged, and the CE is the mean over the
predictions made at positions `>= skip_first`. Position 0 is an attention sink on many models
(on SmolLM2 its residual norm is about 7 times the others'): it would dominate the squared
error and the variance, SAEs are trained without it (:mod:`featopt.dictionaries.activations` skips the
same positions), and the prediction made there sees only position 0, so it would be the same
in the clean, spliced and ablated runs and only dilute the CE differences.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.models.sae.attach import site_of
from featopt.models.sae.model import SparseAutoencoder

#: The keys of each :func:`evaluate` row, in table order (the CE ones only with `ce=True`).
METRIC_KEYS = (
    "mse", "mse_per_element", "fvu", "explained_variance", "l0", "dead_fraction",
    "ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "tokens",
)
CE_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered")


def _rows(x: Tensor) -> Tensor:
    """`[..., w]` -> `[rows, w]`, detached, float32 at least (sums are taken in float64)."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise FeatoptError(f"activations {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape.")


class _Base(Metric):
    is_differentiable, full_state_update = False, False

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

    def update(self, z: Tensor) -> None:
        z = z.detach().reshape(-1, z.shape[-1])
        self.active += (z > 0).sum()
        self.tokens += z.shape[0]

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

    def update(self, z: Tensor) -> None:
        if z.shape[-1] != self.d_sae:
            raise FeatoptError(f"latents are {z.shape[-1]} wide but this metric was made for d_sae = {self.d_sae}.")
        z = z.detach().reshape(-1, z.shape[-1])
        self.fired += (z > 0).sum(0)
        self.tokens += z.shape[0]

    def compute(self) -> Tensor:
        return self.fired.double() / self.tokens


class DeadFraction(FiringFrequency):
    """Fraction of latents that never fired (never `> 0`) on any token seen."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return (self.fired == 0).double().mean()


class MeanCrossEntropy(_Base):
    """Mean next-token cross-entropy (nats) of `logits [B, T, V]` for `ids [B, T]`, over the
    predictions made at positions `skip_first .. T-2` (position t predicts token t+1)."""

    higher_is_better = False

    def __init__(self, skip_first: int = 1, **kwargs):
        super().__init__(**kwargs)
        if skip_first < 0:
            raise FeatoptError(f"skip_first must be 0 or more, got {skip_first}.")
        self.skip_first = skip_first
        self._add_sum("sum_nll")
        self._add_sum("predictions", dtype=torch.long)

    def update(self, logits: Tensor, ids: Tensor) -> None:
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise FeatoptError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}: expected [B, T, V] and [B, T].")
        s = self.skip_first
        if ids.shape[1] - 1 <= s:
            raise FeatoptError(f"contexts of {ids.shape[1]} tokens leave no prediction after skipping {s} positions.")
        targets = ids[:, s + 1:].to(logits.device)
        # One context at a time: a float32 copy of [B, T, V] logits can be large (V ~ 50k).
        for row_logits, row_targets in zip(logits[:, s:-1], targets):
            nll = F.cross_entropy(row_logits.float(), row_targets, reduction="sum")
            self.sum_nll += nll.to(torch.float64)
        self.predictions += targets.numel()

    def compute(self) -> Tensor:
        return self.sum_nll / self.predictions


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """`(CE_zero - CE_sae) / (CE_zero - CE_clean)`: nan where ablating the site changes nothing."""
    denominator = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denominator if denominator != 0 else math.nan


class _SAEMetrics:
    """Every reconstruction metric of one SAE, on one device."""

    def __init__(self, sae: SparseAutoencoder, device: torch.device):
        self.mse = ReconstructionMSE().to(device)
        self.fvu = FractionVarianceUnexplained(sae.d_in).to(device)
        self.l0 = MeanL0().to(device)
        self.firing = FiringFrequency(sae.d_sae).to(device)

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        self.mse.update(x, x_hat)
        self.fvu.update(x, x_hat)
        self.l0.update(z)
        self.firing.update(z)

    def compute(self, d_in: int) -> dict:
        mse, fvu = self.mse.compute().item(), self.fvu.compute().item()
        freq = self.firing.compute()
        return {
            "mse": mse, "mse_per_element": mse / d_in, "fvu": fvu, "explained_variance": 1.0 - fvu,
            "l0": self.l0.compute().item(), "dead_fraction": (freq == 0).double().mean().item(),
            "firing_frequency": freq.float().cpu(), "tokens": int(self.mse.tokens.item()),
        }


def _sae_device(sae: SparseAutoencoder) -> torch.device:
    return sae.W_enc.device


def _sites(adapter: ModelAdapter, saes: Sequence[SparseAutoencoder]) -> list[Site]:
    sites = []
    for i, sae in enumerate(saes):
        if not isinstance(sae, SparseAutoencoder):
            raise FeatoptError(f"SAE {i} is a {type(sae).__name__}, not a SparseAutoencoder.")
        if not sae.cfg.hook_name:
            raise FeatoptError(f"SAE {i} names no site (its cfg.hook_name is empty): set it, e.g. 'blocks.6.resid_post'.")
        site = adapter.site(site_of(sae))  # any spelling: SAELens', sparsify's, featopt's
        if adapter.feature_map(site) is not None:
            raise FeatoptError(f"the adapter yields a feature map's features at {site}, not its activations: "
                               f"evaluate SAEs with the plain adapter.")
        sites.append(site)
    return sites


@torch.inference_mode()
def evaluate(
    adapter: ModelAdapter,
    saes: Sequence[SparseAutoencoder],
    contexts: Tensor,
    *,
    batch_size: int = 8,
    skip_first: int = 1,
    ce: bool = True,
    progress: bool = False,
    frequency: bool = False,
) -> list[dict]:
    """Evaluate SAEs (each at its `cfg.hook_name`) on token contexts `[N, T]`.

    Args:
        batch_size: contexts per forward.
        skip_first: leading positions of every context left out of every metric, and left
            unchanged by the splice and the ablation (see the module docstring: position 0 is an
            attention sink with an outlying norm on many models). 0 keeps them all.
        ce: also run the full forwards for the CE loss recovered.
        progress: show a progress bar (tqdm, on stderr).
        frequency: also give each SAE's per-latent firing frequency, `"firing_frequency"`: a float
            tensor `[d_sae]` on the CPU.
    Returns:
        One dict per SAE, in order: `mse` (squared error summed over d_in, mean over tokens),
        `mse_per_element` (mean over tokens and d_in), `fvu`, `explained_variance`, `l0`,
        `dead_fraction`, with `ce=True` `ce_clean`, `ce_sae`, `ce_zero` (mean next-token CE,
        nats) and `ce_loss_recovered`, and `tokens` (tokens evaluated). Floats and an int.

    Under `torch.distributed`, every rank must call this (on its own share of the contexts):
    the metrics are summed over ranks, so all ranks return the metrics of all contexts.
    """
    from tqdm.auto import tqdm

    saes = list(saes)
    if not saes:
        raise FeatoptError("no SAE to evaluate: give at least one.")
    if contexts.dim() != 2 or contexts.shape[0] == 0:
        raise FeatoptError(f"contexts must be token ids [N, T] with N >= 1, got shape {tuple(contexts.shape)}.")
    if batch_size < 1:
        raise FeatoptError(f"batch_size must be at least 1, got {batch_size}.")
    length = contexts.shape[1]
    needed = skip_first + (2 if ce else 1)  # ce: a prediction needs a position and its next token
    if skip_first < 0 or length < needed:
        raise FeatoptError(f"contexts of {length} tokens with skip_first={skip_first} leave no "
                           f"{'prediction' if ce else 'position'} to evaluate: need at least {needed} tokens.")
    sites = _sites(adapter, saes)
    distinct = sorted(set(sites))
    device = adapter.device

    recon = [_SAEMetrics(sae, _sae_device(sae)) for sae in saes]
    if ce:
        ce_clean = MeanCrossEntropy(skip_first).to(device)
        ce_zero = {site: MeanCrossEntropy(skip_first).to(device) for site in distinct}
        ce_sae = [MeanCrossEntropy(skip_first).to(device) for _ in saes]

    def zero_ablate(act: Tensor, site: Site) -> Tensor:
        act = act.clone()
        act[:, skip_first:] = 0
        return act

    def splicer(sae: SparseAutoencoder):
        def splice(act: Tensor, site: Site) -> Tensor:
            x = act[:, skip_first:]
            x_hat = sae.decode(sae.encode(x.to(_sae_device(sae))))
            act = act.clone()
            act[:, skip_first:] = x_hat.to(act.device, act.dtype)
            return act
        return splice

    with tqdm(total=contexts.shape[0], desc="evaluating SAEs", unit="ctx", disable=not progress, leave=False) as bar:
        for batch in contexts.split(batch_size):
            ids = batch.to(device)
            acts = adapter.run(distinct, input_ids=ids)
            for i, (sae, site, metrics) in enumerate(zip(saes, sites, recon)):
                x = acts[site][:, skip_first:]
                if x.shape[-1] != sae.d_in:
                    raise FeatoptError(f"SAE {i} reads {sae.d_in}-wide activations but {site} of model "
                                       f"{adapter.name!r} is {x.shape[-1]} wide: use an SAE made for this site.")
                x = x.reshape(-1, x.shape[-1]).to(_sae_device(sae))
                z = sae.encode(x)
                metrics.update(x, sae.decode(z), z)
            if ce:
                ce_clean.update(adapter.logits(ids), ids)
                for site in distinct:
                    with adapter.hooks(write={site: zero_ablate}):
                        ce_zero[site].update(adapter.logits(ids), ids)
                for sae, site, metric in zip(saes, sites, ce_sae):
                    with adapter.hooks(write={site: splicer(sae)}):
                        metric.update(adapter.logits(ids), ids)
            bar.update(len(batch))

    results = []
    clean = ce_clean.compute().item() if ce else None
    for i, (sae, site) in enumerate(zip(saes, sites)):
        row = recon[i].compute(sae.d_in)
        freq = row.pop("firing_frequency")
        tokens = row.pop("tokens")
        if ce:
            zero, spliced = ce_zero[site].compute().item(), ce_sae[i].compute().item()
            row.update(ce_clean=clean, ce_sae=spliced, ce_zero=zero, ce_loss_recovered=ce_loss_recovered(clean, spliced, zero))
        row["tokens"] = tokens
        if frequency:
            row["firing_frequency"] = freq
        results.append(row)
    return results


def _scalar(value) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)


def _cell(value) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    return "-"


def format_metrics(rows: Sequence[dict], names: Sequence[str]) -> str:
    """A plain-text table of :func:`evaluate` rows: one line per metric, one column per SAE.

    Non-scalar entries (the firing frequencies) are left out; a metric a row lacks shows `-`.
    """
    rows, names = list(rows), [str(n) for n in names]
    if len(rows) != len(names):
        raise FeatoptError(f"{len(rows)} rows of metrics but {len(names)} names: give one name per SAE.")
    keys = [k for k in METRIC_KEYS if any(k in row for row in rows)]
    keys += [k for row in rows for k in row if k not in keys and _scalar(row[k])]
    keys = list(dict.fromkeys(keys))
    table = [["metric", *names]] + [[k, *(_cell(row.get(k)) for row in rows)] for k in keys]
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    lines = []
    for n, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
