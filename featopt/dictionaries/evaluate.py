"""How good an SAE is: reconstruction (MSE, FVU), sparsity (L0, dead latents) and CE loss recovered.

:func:`evaluate` runs the metrics of :mod:`featopt.dictionaries.metrics` (summed over batches and
DDP ranks) for several SAEs over token contexts `[N, T]`:

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

from collections.abc import Sequence

import torch
from torch import Tensor

from featopt.dictionaries.metrics import (
    FiringFrequency, FractionVarianceUnexplained, MeanCrossEntropy, MeanL0, ReconstructionMSE, ce_loss_recovered,
)
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
