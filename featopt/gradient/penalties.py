"""Penalties on the input itself, to add to a feature objective: `l1_target(sel) + 0.1 * fluency()`.

They read no site (`sites == ()`): they score `ctx.embeds`, the input the parametrization made.
A `Sum` collects the sites of its terms, so a penalty adds nothing to the activations a step reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.cache import cache_dir
from featopt.gradient.decoding import nearest_decode, pinv_decoder
from featopt.errors import FeatoptError
from featopt.objectives.objective import Context, Objective

FLUENCY_DECODERS = ("nearest", "pinv")
_CHUNK = 8192  # vocabulary rows per step when measuring norms: no float32 copy of a large E


@torch.no_grad()
def mean_token_norm(embedding: Tensor) -> float:
    """Mean L2 norm of the rows of `embedding [vocab, d_model]`, summed in float32 by chunks."""
    total = sum(float(embedding[s:s + _CHUNK].float().norm(dim=1).sum()) for s in range(0, embedding.shape[0], _CHUNK))
    return total / embedding.shape[0]


class EmbeddingNormPenalty(Objective):
    """Keeps each optimized embedding near the norm of real tokens: per problem,
    `mean_t (||e_t||_2 - r)^2` over `ctx.embeds [rows, tokens, d_model]` -> `[rows]`.

    Args:
        target: the radius r; None takes the mean norm of the model's token embeddings,
            measured once per embedding matrix and cached.
    """

    reads_input = True  # scores the continuous input: gradient methods only

    def __init__(self, target: float | None = None):
        if target is not None and not target > 0:
            raise FeatoptError(f"embedding_norm target must be a positive norm, got {target}.")
        self.target = None if target is None else float(target)
        self._measured: tuple[tuple, float] | None = None  # (which matrix, its mean norm)
        self.description = "embedding_norm(r=mean token norm)" if target is None else f"embedding_norm(r={target:g})"

    def radius(self, ctx: Context) -> float:
        if self.target is not None:
            return self.target
        emb = ctx.adapter.embedding
        key = (emb.data_ptr(), tuple(emb.shape), emb.dtype, str(emb.device))
        if self._measured is None or self._measured[0] != key:
            self._measured = (key, mean_token_norm(emb))
        return self._measured[1]

    def loss(self, ctx: Context) -> Tensor:
        # float32 even under autocast: a bf16 norm carries only ~3 significant digits.
        norms = ctx.embeds.float().norm(dim=-1)  # [rows, tokens]
        return ((norms - self.radius(ctx)) ** 2).mean(dim=-1)


class FluencyPenalty(Objective):
    """The model's own next-token cross-entropy of the input, mean over the `tokens - 1`
    predicted positions: lower is more fluent text. Costs one full forward of the model.

    The full model runs on `ctx.embeds [rows, tokens, d_model]` (gradients flow into them), and
    position t's logits are scored against the input's token at t + 1:

    * hard targets (default): the current decoding of the embeddings by `decoder` ("nearest"
      cosine or "pinv"); ids carry no gradient, so it flows through the logits only. With
      `straight_through`, the forward runs on the decoded tokens' own embeddings and the
      gradient is passed to `ctx.embeds` unchanged, so the loss is exactly the decoded text's
      LM loss (in the units a reader cares about) rather than the continuous input's;
    * soft targets: `soft(ctx.rows)` gives token distributions `[rows, tokens, vocab]` (a
      simplex prior's softmax), and the loss is `-sum_v q_{t+1}(v) log p(v | e_<=t)`, with
      gradients through both q and the logits (GBDA's fluency term). Pass a bound method, e.g.
      a simplex's `probs(rows)`: multi-process runs pickle the objective, and lambdas don't pickle.

    Returns `[rows]`, float32.
    """

    reads_input = True  # scores the continuous input: gradient methods only

    def __init__(self, decoder: str = "nearest", soft: Callable[[Tensor], Tensor] | None = None,
                 straight_through: bool = False):
        if decoder not in FLUENCY_DECODERS:
            raise FeatoptError(f"fluency decoder {decoder!r} is not known: allowed are {', '.join(FLUENCY_DECODERS)}.")
        if soft is not None and straight_through:
            raise FeatoptError("fluency takes soft targets or straight_through decoding, not both.")
        self.decoder, self.soft, self.straight_through = decoder, soft, straight_through
        mode = "soft" if soft is not None else decoder + (", straight-through" if straight_through else "")
        self.description = f"fluency({mode})"

    def target_ids(self, ctx: Context) -> Tensor:
        """The token ids `[rows, tokens]` the embeddings currently decode to (no gradient)."""
        embedding = ctx.adapter.embedding
        embeds = ctx.embeds.detach().to(embedding.device)
        if self.decoder == "pinv":
            return pinv_decoder(embedding, cache_dir()).decode(embeds)
        return nearest_decode(embedding, embeds)

    def loss(self, ctx: Context) -> Tensor:
        rows, tokens, _ = ctx.embeds.shape
        if tokens < 2:
            raise FeatoptError(f"fluency needs at least 2 tokens (it predicts token t + 1 from t), got {tokens}.")
        adapter, x = ctx.adapter, ctx.embeds
        ids = self.target_ids(ctx) if self.soft is None else None  # [rows, tokens]
        if self.straight_through:  # value of the tokens, gradient of the identity
            x = x + (adapter.embedding[ids].to(x.dtype) - x).detach()
        x = x.to(adapter.dtype)
        if adapter.bos:  # the run's fixed BOS first (--bos), as every other forward of the run
            bos = adapter.embedding[adapter.bos_token_id()].to(x.device)
            x = torch.cat([bos.expand(rows, 1, -1), x], dim=1)
        logits = adapter.model(inputs_embeds=x, use_cache=False).logits[:, int(adapter.bos):]  # [rows, tokens, vocab]
        # float32 log-probabilities even under bf16 autocast: a cross-entropy over a large vocabulary.
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [rows, tokens - 1, vocab]
        if ids is not None:
            nll = -logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)  # [rows, tokens - 1]
        else:
            probs = self.soft(ctx.rows)
            if tuple(probs.shape) != (rows, tokens, logp.shape[-1]):
                raise FeatoptError(f"fluency's soft targets must be [rows, tokens, vocab] = "
                                   f"{[rows, tokens, logp.shape[-1]]}, got {list(probs.shape)}.")
            nll = -(probs[:, 1:].float().to(logp.device) * logp).sum(dim=-1)
        return nll.mean(dim=-1)


def embedding_norm(target: float | None = None) -> EmbeddingNormPenalty:
    return EmbeddingNormPenalty(target)


def fluency(decoder: str = "nearest", soft: Callable[[Tensor], Tensor] | None = None,
            straight_through: bool = False) -> FluencyPenalty:
    return FluencyPenalty(decoder, soft, straight_through)
