"""Candidate sequences through the model for the swap searches (GCG, EPO, discrete inversion).

Every candidate is a fixed prefix (possibly empty) plus N searched tokens. The prefix runs once
with caching; its keys/values are broadcast over each batch, and its activations are constants
prepended to every candidate's, so objectives see the whole sequence `[B, L + N, W]` (positions
index the whole sequence, as in the exhaustive and greedy searches). Two passes:

- `gradient`: the loss's gradient w.r.t. a one-hot input `[R, N, V]` (embeddings = one-hot @ E),
  the source of GCG's candidate swaps;
- `evaluate`: exact losses of candidate batches under `inference_mode`, stopping at the deepest
  site, or running to the LM head when the model's own cross-entropy of the prompt is wanted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.models.adapter import KVPrefix
from featopt.discrete.sweep import AUTO_BATCH, is_oom

#: `loss(acts {site: [B, L + N, W]}, problems [B]) -> [B]`, lower is better.
LossFn = Callable[[dict[Site, Tensor], Tensor], Tensor]
def _wide(x: Tensor) -> Tensor:
    """At least float32 (a bf16 log-softmax is too coarse), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


_LOGIT_ELEMENTS = 2**25  # logits held at once when computing cross-entropy (128 MB in float32)


class CandidateModel:
    """Scores candidate token sequences after one prefix.

    Args:
        sites: the sites the loss reads.
        loss: the objective per candidate (see `LossFn`).
        prefix: `[L]` fixed token ids before the searched ones (may be empty).
        xent: also compute each candidate's cross-entropy under the model (full forward).
        batch_size: candidates per forward (0: automatic; halved on out-of-memory).
        isolated: run the shallowest site's block alone (the documents' isolated blocks).
        proposal: the loss whose gradient proposes swaps (default: `loss`). A smooth surrogate
            of a non-smooth loss ranks swaps better (L1's gradient is only a sign per feature);
            candidates are always scored by `loss` itself.
    """

    def __init__(self, adapter: ModelAdapter, sites: list[Site], loss: LossFn, prefix: Tensor, *,
                 xent: bool = False, batch_size: int = 0, proposal: LossFn | None = None, isolated: bool = False):
        if isolated and (xent or len(prefix)):
            raise FeatoptError("an isolated block is searched alone: no prefix and no cross-entropy (EPO) with it.")
        self.adapter, self.sites, self.loss, self.xent = adapter, list(dict.fromkeys(sites)), loss, xent
        self.isolated = isolated
        self.proposal = proposal or loss
        self.batch_size = batch_size or AUTO_BATCH.get(adapter.device.type, AUTO_BATCH["cpu"]) // (4 if xent else 1)
        self.prefix = prefix.to(adapter.device)
        self.kv: KVPrefix | None = None
        self.prefix_logp: Tensor | None = None  # [V] log-probs of the first searched token
        if len(prefix):
            # no_grad, not inference_mode: gradients later flow through attention over this cache.
            with torch.no_grad():
                cache = DynamicCache(config=adapter.model.config)
                acts, hidden = self._forward(ids=self.prefix[None], cache=cache)
                self.kv = KVPrefix(self.prefix[None], acts, cache)
                if xent:
                    self.prefix_logp = F.log_softmax(_wide(adapter.lm_head(hidden[0, -1])), dim=-1)

    # ------------------------------------------------------------------ forwards
    def _forward(self, *, ids: Tensor | None = None, embeds: Tensor | None = None, cache=None):
        """`({site: [B, n, W]} for the new positions, final hidden states [B, n, d] or None)`."""
        if not self.xent:
            acts = self.adapter.run(self.sites, input_ids=ids, inputs_embeds=embeds, cache=cache,
                                    isolated=self.isolated)
            return acts, None
        x = ids if ids is not None else embeds
        batch, new = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        device = self.adapter.device
        kwargs = {"use_cache": cache is not None,
                  "attention_mask": torch.ones(batch, past + new, dtype=torch.long, device=device),
                  "position_ids": torch.arange(past, past + new, device=device).expand(batch, -1)}
        if cache is not None:
            kwargs["cache"] = cache
        if ids is not None:
            kwargs["input_ids"] = ids.to(device)
        else:
            kwargs["inputs_embeds"] = embeds.to(self.adapter.dtype)
        with self.adapter.hooks(read=self.sites) as captured:
            hidden = self.adapter.base(**kwargs).last_hidden_state
        acts = {}
        for site in self.sites:
            feature_map = self.adapter.feature_map(site)
            acts[site] = captured[site] if feature_map is None else feature_map.features(captured[site])
        return acts, hidden

    def _with_prefix(self, acts: dict[Site, Tensor]) -> dict[Site, Tensor]:
        if self.kv is None:
            return acts
        return {s: torch.cat([self.kv.acts[s].expand(a.shape[0], -1, -1).to(a.dtype), a], dim=1) for s, a in acts.items()}

    def _cache(self, batch: int):
        return self.kv.broadcast(torch.zeros(batch, dtype=torch.long)) if self.kv is not None else None

    def cross_entropy(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy of the searched tokens `ids [B, N]` given everything
        before them (the prefix's last prediction for the first; none without a prefix), from
        the final hidden states `hidden [B, N, d]` -> `[B]`."""
        B, N = ids.shape
        ids = ids.to(hidden.device)
        chunk = max(1, _LOGIT_ELEMENTS // max(1, N * self.adapter.vocab_size))
        parts = []
        for s in range(0, B, chunk):
            h, t = hidden[s:s + chunk, :-1], ids[s:s + chunk, 1:]
            logp = F.log_softmax(_wide(self.adapter.lm_head(h)), dim=-1)
            nll = -logp.gather(-1, t[..., None])[..., 0]  # [b, N - 1]
            if self.prefix_logp is not None:
                nll = torch.cat([-self.prefix_logp[ids[s:s + chunk, :1]], nll], dim=1)
            parts.append(nll.mean(dim=1) if nll.shape[1] else nll.new_zeros(nll.shape[0]))
        return torch.cat(parts)

    # ------------------------------------------------------------------ the two passes
    def gradient(self, ids: Tensor, problems: Tensor, lam: Tensor | None = None, floor: Tensor | None = None,
                 likely: Tensor | None = None, allowed: Tensor | None = None) -> Tensor:
        """`d sum_r [loss_r + lam_r * max(xent_r - floor_r, 0)] / d onehot` for `ids [R, N]` -> `[R, N, V]`
        (float32; `floor` default 0: `lam_r * xent_r`).

        `likely [R]` (needs `xent`): for a row with `likely[r] = M > 0`, every token outside the
        model's own M most probable at a position among `allowed [K]` ids (default all; given the
        tokens before it, read off the same forward) is ranked after every likely one, so the
        gradient's top-k there are the likely tokens that raise the objective most: swaps that keep
        the input fluent. (The offset is twice the row's
        gradient span plus 1, so a top-k wider than the set, as a stuck row's, goes on to the other
        tokens in the gradient's order.)

        Rows are independent, so they run in chunks that bound the logits held for backward."""
        E = self.adapter.embedding
        R, N = ids.shape
        grad = torch.empty(R, N, E.shape[0], dtype=torch.float32)
        chunk = R if not self.xent else max(1, _LOGIT_ELEMENTS // max(1, N * E.shape[0]))
        for s in range(0, R, chunk):
            rows = slice(s, s + chunk)
            onehot = F.one_hot(ids[rows].to(E.device), E.shape[0]).to(E.dtype).requires_grad_(True)
            with torch.enable_grad():
                acts, hidden = self._forward(embeds=onehot @ E, cache=self._cache(onehot.shape[0]))
                loss = self.proposal(self._with_prefix(acts), problems[rows].to(E.device))
                if lam is not None and hidden is not None:
                    xent = self.cross_entropy(hidden, ids[rows])
                    if floor is not None:
                        xent = (xent - floor[rows].to(xent.device, xent.dtype)).clamp(min=0)
                    loss = loss + lam[rows].to(loss.device, loss.dtype) * xent
                (g,) = torch.autograd.grad(loss.sum(), onehot)
            g = g.float().cpu()
            if likely is not None and bool((likely[rows] > 0).any()):
                if hidden is None:
                    raise FeatoptError("likely-token swaps read the model's next-token predictions: they need xent.")
                span = (g.amax(dim=(1, 2)) - g.amin(dim=(1, 2)))[:, None, None] * 2 + 1
                g = g + self._unlikely(hidden.detach(), likely[rows], allowed) * span
            grad[rows] = g
        return grad

    def _unlikely(self, hidden: Tensor, likely: Tensor, allowed: Tensor | None) -> Tensor:
        """`[R, N, V]` float32: 1 where a token is not among row r's `likely[r]` most probable
        allowed next tokens at that position, 0 where it is (and everywhere for `likely[r] = 0`)."""
        R, N = hidden.shape[:2]
        V = most = self.adapter.embedding.shape[0]
        logits = torch.zeros(R, N, V, dtype=torch.float32)
        if self.prefix_logp is not None:
            logits[:, 0] = self.prefix_logp.float().cpu()
        if N > 1:
            logits[:, 1:] = _wide(self.adapter.lm_head(hidden[:, :-1])).float().cpu()
        if allowed is not None:
            barred = torch.ones(V, dtype=torch.bool)
            barred[allowed.cpu()] = False
            logits[..., barred] = -torch.inf
            most = min(V, len(allowed))  # the most tokens a row can have as likely
        out = torch.zeros(R, N, V)
        for r in (likely > 0).nonzero()[:, 0].tolist():
            out[r] = 1
            out[r].scatter_(-1, logits[r].topk(min(int(likely[r]), most), dim=-1).indices, 0.0)
            if self.prefix_logp is None:
                out[r, 0] = 0  # nothing predicts the first token without a prefix: any may go there
        return out

    @property
    def scores_all(self) -> bool:
        """Whether one forward can score a candidate for every problem (`evaluate_all`)."""
        return hasattr(self.loss, "all")

    def evaluate_all(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Every problem's exact loss of candidates `ids [C, N]` -> `([C, P], xent [C] or None)`
        (float64, CPU): the cross-entropy is the sequence's own, shared by every problem."""
        if not self.scores_all:
            raise TypeError("this loss scores one problem per candidate: use evaluate")
        return self.evaluate(ids, None)

    @torch.inference_mode()
    def evaluate(self, ids: Tensor, problems: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Exact `(loss [C], xent [C] or None)` of candidates `ids [C, N]` for `problems [C]`
        (float64, on the CPU), in batches; a batch that does not fit is halved and retried.
        `problems` None: every problem's loss, `[C, P]` (see `evaluate_all`)."""
        losses, xents = [], []
        size, at = self.batch_size, 0
        # Sized before allocating: on a CPU the OOM killer strikes before an out-of-memory error can be caught.
        size = memory.fit_batch(size, memory.forward_row_bytes(self.adapter.model.config, ids.shape[1] + len(self.prefix),
                                                               logits=self.xent), self.adapter.device,
                                flag="--batch_size", what="scoring candidates")
        while at < len(ids):
            batch = ids[at:at + size]
            try:
                acts, hidden = self._forward(ids=batch, cache=self._cache(len(batch)))
                if problems is None:
                    loss = self.loss.all(self._with_prefix(acts))
                else:
                    loss = self.loss(self._with_prefix(acts), problems[at:at + size].to(self.adapter.device))
                xent = self.cross_entropy(hidden, batch) if hidden is not None else None
            except RuntimeError as error:
                if not is_oom(error) or size == 1:
                    raise
                size = max(1, size // 2)
                continue
            losses.append(loss.double().cpu())
            if xent is not None:
                xents.append(xent.double().cpu())
            at += len(batch)
        loss = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
        return loss, (torch.cat(xents) if self.xent else None)


@torch.inference_mode()
def prompt_xent(adapter: ModelAdapter, ids: Tensor, start: int = 0, batch: int = 64) -> Tensor:
    """The model's own mean next-token cross-entropy of `ids [B, T]` at positions
    `max(1, start)..T-1` (the searched tokens after a `start`-token prefix), by plain HF forwards
    -> `[B]` float64 (0 where no position is predicted)."""
    first = max(1, start)
    out = []
    for s in range(0, len(ids), batch):
        rows = ids[s:s + batch].to(adapter.device)
        logp = F.log_softmax(_wide(adapter.logits(rows)[:, first - 1:-1]), dim=-1)
        nll = -logp.gather(-1, rows[:, first:, None])[..., 0]
        out.append(nll.mean(dim=1).double().cpu() if nll.shape[1] else torch.zeros(len(rows), dtype=torch.float64))
    return torch.cat(out)
