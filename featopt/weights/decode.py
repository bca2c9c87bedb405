"""Streamed decoding of directions through the LM head ("Flash Interpretability", source document 004).

A direction `w [d_model]` (a neuron's input weights, an SAE decoder row) is read as if it were the
residual stream: its logits are `W_U norm(w) + b_U` and its token distribution their softmax. For
`N` directions and `V` tokens the `[N, V]` logits are never held: rows go `row_chunk` at a time and,
within a row chunk, the vocabulary `vocab_chunk` tokens at a time. Per chunk we keep only

- a running top-`K` of the logits (`K = max(k, mean_of)`; an exact threshold filter: only logits
  above the running K-th best can enter, so after the first vocabulary chunk top-k runs over a few
  candidates instead of the whole chunk), and
- a running log-sum-exp (the softmax denominator), so probabilities are exact.

On a CPU with float32 logits (float32 and half-precision heads) both are one fused C pass over each
chunk, while it is in cache (`tile_reduce.c`, built on first use by :mod:`featopt.weights.native`):
a heap of the K best per row behind a vectorized threshold test, and an exp2 sum. Elsewhere
(float64 heads, GPUs, no C compiler, `FEATOPT_NATIVE=0`) the torch ops below do it: same results,
tested against a full softmax either way; the fused pass costs about a third as much (figures in
benchmarks/README.md).

A half-precision head on a CPU is upcast one vocabulary chunk at a time and multiplied in float32:
CPUs multiply bfloat16 several times slower than float32 (see `decode_directions`).

Memory: one `[row_chunk, vocab_chunk]` buffer and `[row_chunk, K]` per chunk (and a float32
`[vocab_chunk, d_model]` copy of an upcast head's chunk), whatever N and V.

Final norm (`norm=`): the paper decodes the weights "with the LM-head itself", i.e. `norm="none"`
(the default). `"weight"` multiplies the direction by the final norm's elementwise gain first
(RMSNorm and LayerNorm weight, `1 + weight` for Gemma) and adds nothing else: a direction is not a
point, so no centering or bias. `"apply"` runs the model's own final-norm module on the direction
as if it were a residual vector: RMSNorm rescales it to unit RMS (a positive factor per direction,
so it changes probabilities, not the ranking) and applies the gain; LayerNorm also centers it and
adds its bias (both change the ranking). An LM-head bias, where the model has one, is always added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models.placement import weight_of
from featopt.weights import native

NORMS = ("none", "weight", "apply")
ROW_CHUNK, VOCAB_CHUNK = 512, 8192  # see benchmarks/README.md: ~8 MB float32 logits buffer per step


@dataclass
class Unembed:
    """The LM head and how a direction passes the final norm: `logits = weight @ prepare(x) + bias`."""

    weight: Tensor  # [V, d_model]
    bias: Tensor | None = None  # [V]
    norm: str = "none"
    norm_module: nn.Module | None = None

    @classmethod
    def from_adapter(cls, adapter, norm: str = "none") -> "Unembed":
        if norm not in NORMS:
            raise FeatoptError(f"norm {norm!r} is not known: allowed are {', '.join(NORMS)}.")
        head = adapter.lm_head  # weight_of: loaded where accelerate offloaded it (--device_map)
        bias = weight_of(head, "bias") if isinstance(getattr(head, "bias", None), Tensor) else None
        return cls(weight_of(head), bias, norm, adapter.final_norm)

    def gain(self) -> Tensor:
        """The final norm's elementwise weight `[d_model]` (Gemma stores it as `weight - 1`)."""
        weight = getattr(self.norm_module, "weight", None)
        if not isinstance(weight, Tensor):
            raise FeatoptError("the final norm has no elementwise weight, so norm='weight' is not possible: use none or apply.")
        weight = weight_of(self.norm_module)
        return 1 + weight if type(self.norm_module).__name__.startswith("Gemma") else weight

    def prepare(self, x: Tensor) -> Tensor:
        """Directions `[n, d_model]` -> what the LM head multiplies, in the head's dtype."""
        x = x.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.norm == "weight":
            return (x * self.gain()).contiguous()
        if self.norm == "apply":
            with torch.no_grad():
                return self.norm_module(x).contiguous()
        return x.contiguous()


@dataclass
class Decoded:
    """Decoded directions, best token first. `probs`, `logsumexp`, `top_mean` are None when only the
    top ids were asked for (`probabilities=False`)."""

    ids: Tensor  # [N, k] long
    probs: Tensor | None  # [N, k] float32 (float64 for a float64 head)
    logsumexp: Tensor | None  # [N] float32: log of the softmax denominator
    top_mean: Tensor | None  # [N]: mean of the `mean_of` largest probabilities (the finder's normalizer)
    watch_probs: Tensor | None = None  # [N, T]: probabilities of the watched token ids


GROUP = 8  # logits per group of the candidate filter
LOG2E = 1.4426950408889634
# Base-2 logits whose best is in [SAFE_LOW, SAFE_HIGH] can be summed as exp2 without a shift, in
# float32 as in float64: no term overflows (2^100 * 2^20 tokens < 2^127) and the terms that flush to
# zero (below 2^-126) are under 2^-66 of the largest, far below float32's resolution.
SAFE_LOW, SAFE_HIGH = -60.0, 100.0


def _plain_topk(run_v, run_i, logits: Tensor, offset: int, K: int) -> tuple[Tensor, Tensor]:
    ids = torch.arange(offset, offset + logits.shape[1], device=logits.device).expand(len(logits), -1)
    v = logits if run_v is None else torch.cat([run_v, logits], 1)
    i = ids if run_i is None else torch.cat([run_i, ids], 1)
    top, j = torch.topk(v, min(K, v.shape[1]), dim=1, sorted=False)
    return top, i.gather(1, j)


def _merge(run_v: Tensor | None, run_i: Tensor | None, logits: Tensor, offset: int, K: int) -> tuple[Tensor, Tensor]:
    """Running top-K `[R, K]` merged with a logits chunk `[R, vc]` whose first column is token `offset`.

    A full top-k over every chunk would cost a third of the matmul on a CPU. Instead the chunk is
    cut into groups of GROUP logits (group g: columns g, g + G, g + 2G, ...: a cheap vectorized
    max), and only logits of groups whose max beats a lower bound of the K-th best logit are
    gathered: the running K-th best, or in a first chunk the K-th best group max (K groups reach
    it, so K logits do). The few that pass are packed per row and merged by a small top-k.
    """
    R, vc = logits.shape
    have = 0 if run_v is None else run_v.shape[1]
    if logits.is_cuda or vc % GROUP or vc // GROUP < K or 0 < have < K:  # GPUs: plain top-k, no host sync
        return _plain_topk(run_v, run_i, logits, offset, K)
    G = vc // GROUP
    gmax = logits.view(R, GROUP, G).amax(1)  # [R, G]
    if have:
        bound = run_v.amin(1, keepdim=True)
        rows, gs = (gmax > bound).nonzero(as_tuple=True)
    else:
        bound = torch.topk(gmax, K, dim=1, sorted=False).values.amin(1, keepdim=True)
        rows, gs = (gmax >= bound).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return run_v, run_i
    # 1-D index_select and index_put throughout: much cheaper than 2-D advanced indexing on a CPU.
    cols = (gs[:, None] + G * torch.arange(GROUP, device=gs.device)).view(-1)  # each group's columns
    values = logits.view(-1).index_select(0, (rows * vc).repeat_interleave(GROUP) + cols)
    limit = bound.view(-1).index_select(0, rows).repeat_interleave(GROUP)
    keep = (values > limit if have else values >= limit).nonzero().squeeze(1)  # rows stay sorted
    rows, values, cols = rows.index_select(0, keep // GROUP), values.index_select(0, keep), cols.index_select(0, keep)
    # Row r's candidates after its running top-K, in a padded [R, K + width] block.
    counts = torch.bincount(rows, minlength=R)
    pos = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts).index_select(0, rows)
    width = have + int(counts.max())
    cand_v = logits.new_full((R, width), float("-inf"))
    cand_i = torch.zeros((R, width), dtype=torch.long, device=logits.device)
    if have:
        cand_v[:, :have], cand_i[:, :have] = run_v, run_i
    flat = rows * width + have + pos
    cand_v.view(-1).index_put_((flat,), values)
    cand_i.view(-1).index_put_((flat,), cols + offset)
    top, j = torch.topk(cand_v, K, dim=1, sorted=False)
    return top, cand_i.gather(1, j)


@torch.no_grad()
def decode_directions(
    directions: Tensor, unembed: Unembed, *, k: int = 10, mean_of: int = 100, watch: Tensor | None = None,
    probabilities: bool = True, row_chunk: int = ROW_CHUNK, vocab_chunk: int = VOCAB_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> Decoded:
    """Top-`k` tokens of each direction `[N, d_model]` through the LM head, streamed.

    `watch [T]`: token ids whose probability is kept for every direction (the neuron finder).
    `progress(n)` is called after each row chunk with its number of rows. Results are on the CPU.
    """
    V, d = unembed.weight.shape
    if directions.ndim != 2 or directions.shape[1] != d:
        raise FeatoptError(f"directions must be [N, d_model={d}], got {list(directions.shape)}.")
    if min(k, mean_of, row_chunk, vocab_chunk) < 1:
        raise FeatoptError("k, mean_of, row_chunk and vocab_chunk must all be at least 1.")
    k, mean_of = min(k, V), min(mean_of, V)
    K = max(k, mean_of) if probabilities else k
    W, b = unembed.weight, unembed.bias
    half = W.dtype in (torch.float16, torch.bfloat16)
    acc = torch.float32 if half else W.dtype  # reduce half-precision heads in float32
    # A CPU multiplies bfloat16 5-10 times slower than float32 (measured on [512, 576] x [576, 8192]:
    # 8 against 45 GFLOPS, two cores), so a half head is upcast there one vocabulary chunk at a time
    # (2 ms a chunk) and multiplied in float32: faster, and logits of the exact half products.
    upcast = half and W.device.type == "cpu"
    work = torch.float32 if upcast else W.dtype  # the dtype of the matmul and its logits buffer
    # Logits are computed in base 2 (times log2 e): exp2 is over twice as fast as exp on a CPU. Full
    # precision: the factor goes into the directions before the matmul; half: after it, in float32.
    pre = 1.0 if work in (torch.float16, torch.bfloat16) else LOG2E
    b2 = None if b is None else b.to(work) * pre
    # A logits row of the buffer, plus float32 working copies as large (candidates, exp2 sums); and the
    # float32 copy of one vocabulary chunk of an upcast head.
    vc_max = min(vocab_chunk, V)
    row_chunk = memory.fit_batch(row_chunk, vc_max * (work.itemsize + 12), W.device, flag="--row_chunk",
                                 fixed=vc_max * d * 4 if upcast else 0, what="decoding directions through the LM head")
    buffer = torch.empty(row_chunk * vc_max, dtype=work, device=W.device)
    # On a CPU with float32 logits, one fused C pass per chunk replaces _merge and the exp2 sum.
    fused = native.kernel() if W.device.type == "cpu" and acc == torch.float32 else None
    out = {"ids": [], "probs": [], "lse": [], "mean": [], "watch": []}
    for r0 in range(0, len(directions), row_chunk):
        h = unembed.prepare(directions[r0:r0 + row_chunk])  # [R, d]
        h2, R = h.to(work) * pre, len(h)
        run_v = run_i = None
        lse2 = torch.full((R,), float("-inf"), dtype=acc, device=W.device)  # base-2 log-sum-exp
        reducer = None if fused is None else native.TileReducer(fused, R, K, lse=probabilities)
        for v0 in range(0, V, vocab_chunk):
            vc = min(vocab_chunk, V - v0)
            logits = torch.mm(h2, W[v0:v0 + vc].to(work).T, out=buffer[:R * vc].view(R, vc))
            if b2 is not None:
                logits += b2[v0:v0 + vc]
            if work != acc:
                logits = logits.float().mul_(LOG2E)
            if reducer is not None:
                reducer.update(logits, v0)
                continue
            run_v, run_i = _merge(run_v, run_i, logits, v0, K)
            if probabilities:
                # Shift by the best logit so far (>= every logit of this chunk) so that exp2 never
                # overflows, unless no shift is needed (see SAFE_LOW; on a CPU: it saves a pass).
                best = run_v.amax(1, keepdim=True)
                if not logits.is_cuda and SAFE_LOW <= float(best.min()) and float(best.max()) <= SAFE_HIGH:
                    chunk = logits.exp2_().sum(1).log2_()
                else:
                    chunk = logits.sub_(best).exp2_().sum(1).log2_() + best[:, 0]
                lse2 = torch.logaddexp2(lse2, chunk)
        if reducer is not None:
            (run_v, run_i), lse2 = reducer.top(), reducer.logsumexp2().to(acc)
        top, order = run_v.sort(dim=1, descending=True)
        out["ids"].append(run_i.gather(1, order)[:, :k].cpu())
        if probabilities:
            probs = (top - lse2[:, None]).exp2()
            lse = lse2 / LOG2E
            out["probs"].append(probs[:, :k].cpu())
            out["mean"].append(probs[:, :mean_of].mean(1).cpu())
            out["lse"].append(lse.cpu())
            if watch is not None:
                out["watch"].append(token_probs(h, unembed, watch, lse, prepared=True).cpu())
        if progress is not None:
            progress(R)
    cat = lambda key: torch.cat(out[key]) if out[key] else None  # noqa: E731
    return Decoded(cat("ids"), cat("probs"), cat("lse"), cat("mean"), cat("watch"))


@torch.no_grad()
def token_probs(directions: Tensor, unembed: Unembed, ids: Tensor, logsumexp: Tensor, *, prepared: bool = False) -> Tensor:
    """Probabilities `[N, T]` of tokens `ids [T]` for directions `[N, d]` whose softmax denominator
    is known (`logsumexp [N]`, from :func:`decode_directions`): one small matmul, no vocabulary pass."""
    h = directions if prepared else unembed.prepare(directions)
    ids = torch.as_tensor(ids, device=unembed.weight.device)
    rows = unembed.weight[ids]
    if rows.dtype in (torch.float16, torch.bfloat16) and rows.device.type == "cpu":  # as decode_directions does
        h, rows = h.float(), rows.float()
    logits = h.to(rows.dtype) @ rows.T
    if unembed.bias is not None:
        logits += unembed.bias[ids].to(logits.dtype)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return (logits - logsumexp.to(logits.device)[:, None]).exp()
