"""How good an SAE is: reconstruction (MSE, FVU), sparsity (L0, dead latents), CE loss recovered
and the KL divergence of the next-token distributions.

:func:`evaluate` runs the metrics of :mod:`featopt.dictionaries.metrics` (summed over batches and
DDP ranks) for several SAEs over token contexts `[N, T]`:

- one forward, stopped at the deepest site, gives every SAE's input and target activations: an SAE
  reconstructs its input (its site, `cfg.hook_name`); a transcoder reads `cfg.hook_name` (e.g.
  `blocks.6.mlp_in`) and reconstructs its target `cfg.target_hook_name` (e.g. `blocks.6.mlp_out`),
  against which its MSE and FVU are taken;
- for the CE loss recovered, one clean forward, one forward per distinct target site with the
  site zero-ablated and one per SAE with its reconstruction `decode(encode(x))` of its input
  spliced in at its target (for a transcoder: the MLP replaced by the transcoder):
  `recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)` (1: as good as the model itself,
  0: no better than deleting the site). The same forwards give `kl_div`, the mean
  `KL(p_clean || p_spliced)` of the next-token distributions (nats; 0: the splice changes no
  prediction), and `kl_zero`, the same with the site zero-ablated, for scale.

Leading positions (`skip_first`, default 1) are left out everywhere: their activations count in
no metric, the splice and the ablation leave them unchanged, and the CE (and the KL) is the mean
over the predictions made at positions `>= skip_first`. Position 0 is an attention sink on many
models (on SmolLM2 its residual norm is about 7 times the others'): it would dominate the squared
error and the variance, SAEs are trained without it (:mod:`featopt.dictionaries.activations` skips the
same positions), and the prediction made there sees only position 0, so it would be the same
in the clean, spliced and ablated runs and only dilute the CE differences.

A dictionary too wide to encode a batch densely (1M latents: `[tokens, d_sae]` is gigabytes;
`featopt.models.sae.wide.dense_fits` decides) is encoded sparsely, a chunk of latents at a time
(`wide.encode_sparse`), decoded from its nonzeros (the rows of `W_dec` they name, summed per token)
and counted by the metrics' `update_sparse`: the same metrics, and the same reconstruction spliced in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.dictionaries.metrics import (
    FiringFrequency, FractionVarianceUnexplained, MeanCrossEntropy, MeanKLDivergence, MeanL0, ReconstructionMSE,
    ce_loss_recovered,
)
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.models.hooks import KIND_ORDER
from featopt.models.sae import wide
from featopt.models.sae.attach import site_of, target_site_of
from featopt.models.sae.model import SparseAutoencoder

#: The keys of each :func:`evaluate` row, in table order (the CE ones only with `ce=True`).
METRIC_KEYS = (
    "mse", "mse_per_element", "fvu", "explained_variance", "l0", "dead_fraction",
    "ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_div", "kl_zero", "tokens",
)
CE_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_div", "kl_zero")


class _SAEMetrics:
    """Every reconstruction metric of one SAE, on one device."""

    def __init__(self, sae: SparseAutoencoder, device: torch.device):
        self.mse = ReconstructionMSE().to(device)
        self.fvu = FractionVarianceUnexplained(sae.d_out).to(device)
        self.l0 = MeanL0().to(device)
        self.firing = FiringFrequency(sae.d_sae).to(device)

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor | tuple[Tensor, Tensor, Tensor]) -> None:
        """`x, x_hat [n, d_out]`; `z` the latents `[n, d_sae]`, or their COO nonzeros (see `reconstruct`)."""
        self.mse.update(x, x_hat)
        self.fvu.update(x, x_hat)
        if isinstance(z, Tensor):
            self.l0.update(z)
            self.firing.update(z)
        else:
            self.l0.update_sparse(*z, len(x))
            self.firing.update_sparse(*z, len(x))

    def compute(self, d_out: int) -> dict:
        mse, fvu = self.mse.compute().item(), self.fvu.compute().item()
        freq = self.firing.compute()
        return {
            "mse": mse, "mse_per_element": mse / d_out, "fvu": fvu, "explained_variance": 1.0 - fvu,
            "l0": self.l0.compute().item(), "dead_fraction": (freq == 0).double().mean().item(),
            "firing_frequency": freq.float().cpu(), "tokens": int(self.mse.tokens.item()),
        }


def _sae_device(sae: SparseAutoencoder) -> torch.device:
    return sae.W_enc.device


def sparse_encode(sae: SparseAutoencoder, rows: int, latent_chunk: int | None = None) -> bool:
    """Whether `rows` tokens are encoded sparsely: `latent_chunk` forces it, else where the dense
    latents `[rows, d_sae]` do not fit and the SAE can be encoded a chunk at a time."""
    if latent_chunk is not None:
        return True
    return wide.chunkable(sae) and not wide.dense_fits(sae, rows, _sae_device(sae))


def decode_sparse(sae: SparseAutoencoder, rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """`sae.decode(z)` `[n_rows, d_out]` of latents given as COO nonzeros `(rows, cols, values)`
    `[nnz]`, sorted by row (`wide.encode_sparse`): row r is `b_dec` plus the sum of `values[p]
    W_dec[cols[p]]` over its nonzeros. `embedding_bag` reads only those rows of `W_dec` and makes
    no `[nnz, d_out]` copy."""
    offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))  # each row's first nonzero
    weights = values.to(sae.W_dec.dtype)
    return F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=weights) + sae.b_dec


def reconstruct(sae: SparseAutoencoder, x: Tensor, latent_chunk: int | None = None
                ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor, Tensor]]:
    """`x [n, d_in]` -> `(x_hat [n, d_out], latents)`: `x_hat = decode(encode(x)) + skip_out(x)`,
    the latents dense `z [n, d_sae]`, or (see :func:`sparse_encode`) as COO `(rows, cols, values)`
    `[nnz]` encoded `latent_chunk` latents at a time (None: a chunk size that fits)."""
    if not sparse_encode(sae, len(x), latent_chunk):
        z = sae.encode(x)
        return sae.decode(z) + sae.skip_out(x), z
    latents = wide.encode_sparse(sae, x, latent_chunk)
    return decode_sparse(sae, *latents, len(x)) + sae.skip_out(x), latents


def _order(site: Site) -> tuple[int, int]:
    """Where a site comes in the forward."""
    return site.layer, KIND_ORDER[site.kind]


def _sites(adapter: ModelAdapter, saes: Sequence[SparseAutoencoder]) -> tuple[list[Site], list[Site]]:
    """Each SAE's input site and target site (the same site but for a transcoder)."""
    sites, targets = [], []
    for i, sae in enumerate(saes):
        if not isinstance(sae, SparseAutoencoder):
            raise FeatoptError(f"SAE {i} is a {type(sae).__name__}, not a SparseAutoencoder.")
        if not sae.cfg.hook_name:
            raise FeatoptError(f"SAE {i} names no site (its cfg.hook_name is empty): set it, e.g. 'blocks.6.resid_post'.")
        site = adapter.site(site_of(sae))  # any spelling: SAELens', sparsify's, featopt's
        target = adapter.site(target_site_of(sae))
        if _order(target) < _order(site):
            raise FeatoptError(f"transcoder {i} reads {site} but writes {target}, which the model computes before it: "
                               f"its target must come at or after its input.")
        for s in {site, target}:
            if adapter.feature_map(s) is not None:
                raise FeatoptError(f"the adapter yields a feature map's features at {s}, not its activations: "
                                   f"evaluate SAEs with the plain adapter.")
        sites.append(site)
        targets.append(target)
    return sites, targets


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
    latent_chunk: int | None = None,
) -> list[dict]:
    """Evaluate SAEs (each reading its `cfg.hook_name`; a transcoder writing its
    `cfg.target_hook_name`) on token contexts `[N, T]`.

    Args:
        batch_size: contexts per forward.
        skip_first: leading positions of every context left out of every metric, and left
            unchanged by the splice and the ablation (see the module docstring: position 0 is an
            attention sink with an outlying norm on many models). 0 keeps them all.
        ce: also run the full forwards for the CE loss recovered and the KL divergences.
        progress: show a progress bar (tqdm, on stderr).
        frequency: also give each SAE's per-latent firing frequency, `"firing_frequency"`: a float
            tensor `[d_sae]` on the CPU.
        latent_chunk: encode every SAE sparsely, this many latents at a time (None: only an SAE
            whose dense latents `[tokens, d_sae]` of a batch do not fit, in chunks that fit).
    Returns:
        One dict per SAE, in order: `mse` (squared error summed over the reconstructed width,
        d_in or a transcoder's d_out, mean over tokens), `mse_per_element` (mean over tokens and
        that width), `fvu`, `explained_variance`, `l0`, `dead_fraction`, with `ce=True`
        `ce_clean`, `ce_sae`, `ce_zero` (mean next-token CE, nats), `ce_loss_recovered`, `kl_div`
        and `kl_zero` (mean KL of the clean next-token distribution from the spliced and the
        zero-ablated one, nats), and `tokens` (tokens evaluated). Floats and an int.

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
    if latent_chunk is not None and latent_chunk < 1:
        raise FeatoptError(f"latent_chunk must be at least 1 latent, got {latent_chunk}.")
    length = contexts.shape[1]
    needed = skip_first + (2 if ce else 1)  # ce: a prediction needs a position and its next token
    if skip_first < 0 or length < needed:
        raise FeatoptError(f"contexts of {length} tokens with skip_first={skip_first} leave no "
                           f"{'prediction' if ce else 'position'} to evaluate: need at least {needed} tokens.")
    sites, targets = _sites(adapter, saes)
    distinct = sorted(set(sites) | set(targets))
    ablated = sorted(set(targets))
    device = adapter.device

    recon = [_SAEMetrics(sae, _sae_device(sae)) for sae in saes]
    if ce:
        ce_clean = MeanCrossEntropy(skip_first).to(device)
        ce_zero = {site: MeanCrossEntropy(skip_first).to(device) for site in ablated}
        kl_zero = {site: MeanKLDivergence(skip_first).to(device) for site in ablated}
        ce_sae = [MeanCrossEntropy(skip_first).to(device) for _ in saes]
        kl_sae = [MeanKLDivergence(skip_first).to(device) for _ in saes]

    def zero_ablate(act: Tensor, site: Site) -> Tensor:
        act = act.clone()
        act[:, skip_first:] = 0
        return act

    def spliced(sae: SparseAutoencoder, site: Site, target: Site, ids: Tensor) -> Tensor:
        """The logits with the target's activation replaced by `decode(encode(input))`; a
        transcoder's input is read in the same forward, before the target is computed."""
        def splice(act: Tensor, _: Site) -> Tensor:
            x = (act if site == target else captured[site])[:, skip_first:]
            x = x.to(_sae_device(sae))
            if sparse_encode(sae, x.shape[0] * x.shape[1], latent_chunk):  # as the metrics' pass encodes it
                x_hat = reconstruct(sae, x.reshape(-1, x.shape[-1]), latent_chunk)[0].reshape(*x.shape[:-1], -1)
            else:
                x_hat = sae(x)  # decode(encode(x)), plus a skip transcoder's x W_skip^T
            act = act.clone()
            act[:, skip_first:] = x_hat.to(act.device, act.dtype)
            return act

        with adapter.hooks(read=[site] if site != target else [], write={target: splice}) as captured:
            return adapter.logits(ids)

    def check(i: int, sae: SparseAutoencoder, site: Site, width: int, what: str, wanted: int) -> None:
        if width != wanted:
            raise FeatoptError(f"SAE {i} {what} {wanted}-wide activations but {site} of model {adapter.name!r} is "
                               f"{width} wide: use an SAE made for this site.")

    with tqdm(total=contexts.shape[0], desc="evaluating SAEs", unit="ctx", disable=not progress, leave=False) as bar:
        for batch in contexts.split(batch_size):
            ids = batch.to(device)
            acts = adapter.run(distinct, input_ids=ids)
            for i, (sae, site, target, metrics) in enumerate(zip(saes, sites, targets, recon)):
                x, y = acts[site][:, skip_first:], acts[target][:, skip_first:]
                check(i, sae, site, x.shape[-1], "reads", sae.d_in)
                check(i, sae, target, y.shape[-1], "writes", sae.d_out)
                x = x.reshape(-1, x.shape[-1]).to(_sae_device(sae))
                y = y.reshape(-1, y.shape[-1]).to(_sae_device(sae))
                metrics.update(y, *reconstruct(sae, x, latent_chunk))
            if ce:
                clean = adapter.logits(ids)  # kept for the batch: the reference of every KL
                ce_clean.update(clean, ids)
                for site in ablated:
                    with adapter.hooks(write={site: zero_ablate}):
                        logits = adapter.logits(ids)
                    ce_zero[site].update(logits, ids)
                    kl_zero[site].update(clean, logits)
                for i, (sae, site, target) in enumerate(zip(saes, sites, targets)):
                    logits = spliced(sae, site, target, ids)
                    ce_sae[i].update(logits, ids)
                    kl_sae[i].update(clean, logits)
                del clean, logits
            bar.update(len(batch))

    results = []
    clean_ce = ce_clean.compute().item() if ce else None
    for i, (sae, target) in enumerate(zip(saes, targets)):
        row = recon[i].compute(sae.d_out)
        freq = row.pop("firing_frequency")
        tokens = row.pop("tokens")
        if ce:
            zero, spliced_ce = ce_zero[target].compute().item(), ce_sae[i].compute().item()
            row.update(ce_clean=clean_ce, ce_sae=spliced_ce, ce_zero=zero,
                       ce_loss_recovered=ce_loss_recovered(clean_ce, spliced_ce, zero),
                       kl_div=kl_sae[i].compute().item(), kl_zero=kl_zero[target].compute().item())
        row["tokens"] = tokens
        if frequency:
            row["firing_frequency"] = freq
        results.append(row)
    return results
