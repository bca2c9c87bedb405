"""What an SAE latent depends on and what it does, by ablation (source document 002).

- :func:`ablated_text` ("Ablated Text"): remove each earlier token of a context in turn and
  measure the latent at the target token; a token whose removal drops the latent (negative
  change, shown red on a dashboard) is one the latent reads, e.g. the "Q" of a StackExchange "Q:".
- :func:`direction_ablation` ("Ablating Direction"): remove the latent's direction from the
  activation at the SAE's site during a full forward and report how the log-probabilities of the
  next tokens change ("the log-prob of ' Of' went down by 4").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.interventions.edits import project_out, scale_latents
from featopt.models import Site
from featopt.models.sae.attach import site_of, target_site_of
from featopt.dictionaries.lens import check_latents

MODES = ("contribution", "projection")


def _site(adapter, sae) -> Site:
    """The SAE's site on `adapter`, which must yield raw activations there, of the SAE's width."""
    site = adapter.site(site_of(sae))
    if adapter.feature_map(site) is not None:
        raise FeatoptError(f"the adapter yields a feature map's features at {site}, not its activations: "
                           "give the plain adapter.")
    if sae.d_in != adapter.width(site):
        raise FeatoptError(f"the SAE reads {sae.d_in}-wide activations but {site} of model {adapter.name!r} is "
                           f"{adapter.width(site)} wide: use an SAE trained for this model and site.")
    return site


def _one_latent(latent, sae) -> int:
    latents = check_latents(latent, sae.d_sae)
    if len(latents) != 1:
        raise FeatoptError(f"give one latent index, got {len(latents)}.")
    return latents[0]


@dataclass
class AblatedText:
    """The latent at token `target` of `tokens` (`ids[:target+1]`), clean and with each earlier
    token from `first` on removed (the tokens before `first`, the BOS token of `--bos`, are kept).
    `ablated, change, relative [target - first]`: entry j is with token `first + j` removed;
    `change = ablated - base` (negative: that token feeds the latent), `relative = change / base`
    (nan when `base == 0`)."""

    tokens: list[int]
    target: int
    base: float
    ablated: Tensor
    change: Tensor
    relative: Tensor
    first: int = 0

    def record(self, decode: Callable[[list[int]], str]) -> dict:
        """JSON-able: token strings, the changes, relative changes with None for nan; with a kept
        first token (`first` 1) `tokens` and `target` still count it, and `change[j]` is token
        `first + j`'s."""
        return {"tokens": [decode([t]) for t in self.tokens], "target": self.target, "base": self.base,
                "change": [float(c) for c in self.change.tolist()],
                "relative": [None if math.isnan(r) else float(r) for r in self.relative.tolist()],
                **({"first": self.first} if self.first else {})}


@torch.inference_mode()
def ablated_text(adapter, sae, latent: int, ids: Tensor, target: int, *, first: int = 0) -> AblatedText:
    """Document 002's "Ablated Text" for the latent at position `target` of `ids [L]`.

    The context is `ids[:target+1]`; deleting token `j < target` gives a sequence of `target`
    tokens whose last one is the target. All deletions run as ONE batch (equal lengths, no
    padding), plus the clean context; both forwards stop at the SAE's site. Tokens before `first`
    (the BOS token of `--bos`: `first=1`) are never deleted.
    """
    site = _site(adapter, sae)
    latent = _one_latent(latent, sae)
    ids = torch.as_tensor(ids).cpu()
    if ids.ndim != 1 or ids.dtype.is_floating_point or len(ids) < 2:
        raise FeatoptError(f"ids must be one context of at least 2 token ids [L], got shape {tuple(ids.shape)}.")
    if first < 0:
        raise FeatoptError(f"first (the leading tokens kept) must be 0 or more, got {first}.")
    if not first + 1 <= target <= len(ids) - 1:
        raise FeatoptError(f"target must be between {first + 1} and {len(ids) - 1} (a token with one before it to "
                           f"remove), got {target}.")
    ctx = ids[:target + 1].long()
    keep = ~torch.eye(target + 1, dtype=torch.bool)[first:target]  # row j: every token but first + j
    deleted = ctx.expand(target - first, -1)[keep].view(target - first, target)

    def at_last(batch: Tensor) -> Tensor:  # the latent at each row's last token: [rows]
        x = adapter.run([site], input_ids=batch)[site][:, -1]  # [rows, d_in]: only the target is encoded
        return sae.encode(x.to(sae.W_enc.device))[:, latent].float().cpu()

    base = float(at_last(ctx[None])[0])
    ablated = at_last(deleted)
    change = ablated - base
    relative = change / base if base != 0 else torch.full_like(change, float("nan"))
    return AblatedText(ctx.tolist(), target, base, ablated, change, relative, first)


@dataclass
class DirectionAblation:
    """Effect of removing a latent's direction at its site on the next-token log-probabilities.

    `delta [B, L-1]`: ablated minus clean log-prob of the actual next token at each position;
    `active [B, L]`: where the latent fires (clean run). `decreased_ids, decreased [top]`: the
    tokens whose log-prob fell most on average (most negative mean change first) over the active
    positions (all positions when it never fires, `over_active` False); `increased_ids,
    increased [top]` likewise, largest rise first.
    """

    latent: int
    mode: str
    delta: Tensor
    active: Tensor
    decreased_ids: Tensor
    decreased: Tensor
    increased_ids: Tensor
    increased: Tensor
    over_active: bool

    def record(self, decode: Callable[[list[int]], str]) -> dict:
        def pairs(ids: Tensor, values: Tensor) -> list[list]:
            return [[decode([t]), float(v)] for t, v in zip(ids.tolist(), values.tolist())]

        return {"mode": self.mode, "delta": self.delta.tolist(), "active": self.active.tolist(),
                "decreased": pairs(self.decreased_ids, self.decreased),
                "increased": pairs(self.increased_ids, self.increased)}


@torch.inference_mode()
def direction_ablation(adapter, sae, latent: int, contexts: Tensor, *, mode: str = "contribution", top: int = 10,
                       batch_size: int = 8) -> DirectionAblation:
    """Ablate latent `latent`'s direction at the SAE's site in full forwards over `contexts [B, L]`.

    At every position the site's activation `x [d_in]` becomes
    - `"contribution"`: `x - z_i(x) W_dec[i]`, the latent's share of the reconstruction (`z_i` by
      `sae.encode` at that site): where the latent is 0 the activation is unchanged;
    - `"projection"`: `x - (x . d) d` with `d = W_dec[i] / |W_dec[i]|`: no component along it at all.

    A transcoder's decoder writes its target site (the MLP's output), so that is where either edit
    is made, with `z_i` encoded from the input site of the same forward.

    Contexts go `batch_size` at a time (two forwards each, clean and ablated; three float32
    `[batch, L, V]` buffers for the log-softmaxes). Log-probs are float32, results on the CPU.
    """
    if mode not in MODES:
        raise FeatoptError(f"mode {mode!r} is not known: allowed are {', '.join(MODES)}.")
    if min(top, batch_size) < 1:
        raise FeatoptError(f"top and batch_size must be at least 1, got top={top}, batch_size={batch_size}.")
    site = _site(adapter, sae)
    latent = _one_latent(latent, sae)
    contexts = torch.as_tensor(contexts)
    if contexts.ndim != 2 or contexts.dtype.is_floating_point or contexts.shape[0] < 1 or contexts.shape[1] < 2:
        raise FeatoptError("contexts must be token ids [B, L] with B >= 1 and L >= 2, "
                           f"got shape {tuple(contexts.shape)}.")
    device = sae.W_enc.device
    target = adapter.site(target_site_of(sae))
    now: dict = {}  # the input site's activation of the forward being edited (transcoders)
    if mode == "projection":
        if float(sae.W_dec.detach()[latent].norm()) == 0:
            raise FeatoptError(f"latent {latent} has a zero decoder row, so it has no direction to project out: "
                               "use mode contribution.")
        ablate = project_out(sae.W_dec.detach()[latent])
    elif target == site:  # x - z_i(x) W_dec[i]: the latent's share of the reconstruction, rescaled by r = 0
        ablate = scale_latents(sae, [latent], 0.0)
    else:
        def ablate(y: Tensor, _site) -> Tensor:  # y - z_i(x) W_dec[i], x read at the input site just before
            z = sae.encode(now["seen"][site].to(device))[..., latent:latent + 1]
            return y - (z * sae.W_dec.detach()[latent]).to(y.dtype)

    deltas, actives, sums, counts = [], [], [0.0, 0.0], [0, 0]  # sums/counts: [active positions, all]
    for b0 in range(0, len(contexts), batch_size):
        ids = contexts[b0:b0 + batch_size].long().to(adapter.device)
        with adapter.hooks(read=[site]) as seen:
            clean = adapter.logits(ids)
        active = sae.encode(seen[site].to(device))[..., latent] > 0  # [b, L]
        with adapter.hooks(read=[site] if target != site else [], write={target: ablate}) as now["seen"]:
            ablated = adapter.logits(ids)
        diff = torch.log_softmax(ablated.float(), -1) - torch.log_softmax(clean.float(), -1)  # [b, L, V]
        del clean, ablated
        deltas.append(diff[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).cpu())
        active = active.to(diff.device)
        sums[0] = sums[0] + diff[active].sum(0, dtype=torch.float64)
        sums[1] = sums[1] + diff.sum((0, 1), dtype=torch.float64)
        counts[0] += int(active.sum())
        counts[1] += active.numel()
        actives.append(active.cpu())
    over_active = counts[0] > 0
    mean = (sums[0] / counts[0] if over_active else sums[1] / counts[1]).float().cpu()  # [V]
    top = min(top, len(mean))
    down, up = mean.topk(top, largest=False), mean.topk(top)
    return DirectionAblation(latent, mode, torch.cat(deltas), torch.cat(actives), down.indices, down.values,
                             up.indices, up.values, over_active)
