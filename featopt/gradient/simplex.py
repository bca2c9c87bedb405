"""The softmax-simplex prior (source document 000, "Gradient descent with priors"): the learnable
input lives in vocabulary space, one distribution over tokens per position, and the model sees
the expected embedding `softmax(a / T) @ E`, so the input stays close to real tokens and decodes
by argmax, with no pseudoinverse.

Two modes:
- `"softmax"`: `a` are free logits, `embeds = softmax(a / T) @ E` (the usual form).
- `"projected"`: the document's update as written, `a_{n+1} = softmax(a_n - grad)`: `a` itself is
  on the simplex, `embeds = a @ E`, and after every optimizer step `a <- softmax(a / T)`. Entries
  of a simplex point lie in [0, 1], so at T = 1 the projection pulls every row towards uniform;
  T well below 1 (or annealing towards it) is what keeps a row peaked.

Memory: `a` is `[P, T, V]`; with Adam, the parameter and Adam's two moments (3 x P*T*V floats)
persist between steps and the gradient (1 x) exists during each. P = 100 problems of T = 10
tokens in float32: V = 49152 (SmolLM2) is 197 MB a copy, 0.79 GB for all four; V = 262144 (Gemma)
is 1.05 GB a copy, 4.2 GB for all four. The forward also needs the `[rows, V]` softmax, and plain
autograd keeps it and its gradient (2 more copies). Above `chunk_elements` (2**26 elements, 268 MB
in float32) a custom backward runs over blocks of `chunk_elements // V` rows and recomputes each
block's softmax, so the extra memory is about 3 blocks (0.8 GB) whatever P*T*V is (measured on
CPU, V = 262144, P*T = 1000: forward + backward need 1.74 GiB beyond the parameter, of which
0.98 GiB is the gradient, against 2.94 GiB unchunked). V = 49152 at P*T = 1000 stays unchunked.
`dtype=torch.bfloat16` halves the four copies (the softmax is still computed in float32, per
block), at a price: bf16 keeps 8 significant bits, so an update smaller than ~1/256 of a logit's
magnitude is lost, and projected rows sum to 1 only to ~3 digits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from featopt.errors import FeatoptError
from featopt.gradient.parametrization import Parametrization

MODES = ("softmax", "projected")
SCHEDULES = ("linear", "exponential")


class SimplexEmbeddings(Parametrization):
    """Learnable distributions over the vocabulary, `logits [problems, tokens, vocab]`.

    Args:
        init: starting logits `[problems, tokens, vocab]`; in projected mode the parameter starts
            at `softmax(init / temperature)`, on the simplex.
        mode: "softmax" or "projected" (see the module docstring).
        temperature: T at step 0.
        temperature_end: T at the last step (None: constant T), reached by `schedule`
            ("linear" or "exponential" = geometric); T depends only on the step count.
        chunk_elements: above this many `[rows, V]` elements the forward runs in blocks of rows.
        dtype: of the logits (and so of Adam's moments); float32 or bfloat16.
    """

    def __init__(self, init: Tensor, *, mode: str = "softmax", temperature: float = 1.0,
                 temperature_end: float | None = None, schedule: str = "linear",
                 chunk_elements: int = 2**26, dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in MODES:
            raise FeatoptError(f"simplex mode {mode!r} is not known: allowed are {', '.join(MODES)}.")
        if schedule not in SCHEDULES:
            raise FeatoptError(f"temperature schedule {schedule!r} is not known: allowed are {', '.join(SCHEDULES)}.")
        for name, value in (("temperature", temperature), ("temperature_end", temperature_end)):
            if value is not None and not value > 0:
                raise FeatoptError(f"--{name} must be positive, got {value}.")
        if init.dim() != 3:
            raise FeatoptError(f"simplex logits must be [problems, tokens, vocab], got shape {tuple(init.shape)}.")
        if chunk_elements < 1:
            raise FeatoptError(f"chunk_elements must be at least 1, got {chunk_elements}.")
        self.mode, self.schedule, self.chunk_elements = mode, schedule, int(chunk_elements)
        self.temperature_start, self.temperature_end = float(temperature), temperature_end
        self.temperature = self.temperature_start  # the current T, set from the step count
        start = init.detach().float()
        if mode == "projected":
            start = torch.softmax(start / self.temperature, dim=-1)
        self.logits = nn.Parameter(start.to(dtype).contiguous())
        self._embedding: Tensor | None = None  # E [V, d], the model's: never registered

    # ----------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, problems: int, tokens: int, vocab: int, seed: int, noise: float = 0.01, **kw) -> SimplexEmbeddings:
        """Near-uniform rows: logits `noise * N(0, 1)` from `seed` (the noise breaks argmax ties)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return cls(noise * torch.randn(problems, tokens, vocab, generator=gen), **kw)

    @classmethod
    def from_ids(cls, ids: Tensor, problems: int, vocab: int, confidence: float = 0.9, **kw) -> SimplexEmbeddings:
        """Rows peaked at `ids` (`[tokens]`, shared by every problem, or `[problems, tokens]`):
        each position puts probability `confidence` on its token at the starting temperature,
        the rest spread evenly (so the peak means the same for any vocabulary size)."""
        ids = torch.as_tensor(ids).long().cpu()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(problems, -1)
        if ids.dim() != 2 or ids.shape[0] != problems:
            raise FeatoptError(f"ids must be [tokens] or [{problems}, tokens], got shape {tuple(ids.shape)}.")
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise FeatoptError(f"token ids must lie in [0, {vocab}), got {ids.min().item()}..{ids.max().item()}.")
        if not 0 < confidence < 1:
            raise FeatoptError(f"confidence must lie strictly between 0 and 1, got {confidence}.")
        # p = e^g / (e^g + V - 1) at logit gap g / T  =>  g = T * log(p (V - 1) / (1 - p)).
        gap = kw.get("temperature", 1.0) * math.log(confidence * max(vocab - 1, 1) / (1 - confidence))
        return cls(gap * nn.functional.one_hot(ids, vocab).float(), **kw)

    # ----------------------------------------------------------------- Parametrization
    @property
    def n_problems(self) -> int:
        return self.logits.shape[0]

    def bind(self, adapter) -> None:
        embedding = adapter.embedding
        if embedding.shape[0] != self.logits.shape[-1]:
            raise FeatoptError(f"the simplex has {self.logits.shape[-1]} entries per token but the model's "
                               f"vocabulary has {embedding.shape[0]}: build it with vocab={embedding.shape[0]}.")
        self._embedding = embedding.detach()  # a view, no copy; gradients never reach the model

    def __getstate__(self):
        # Spawned workers bind their own model; never pickle its embedding matrix.
        state = super().__getstate__()
        state["_embedding"] = None
        return state

    def forward(self, rows: Tensor | None = None) -> Tensor:
        """`rows [R]` (None: all) -> expected embeddings `[R, tokens, d_model]` in E's dtype."""
        if self._embedding is None:
            raise FeatoptError("SimplexEmbeddings needs the model's embedding matrix: call bind(adapter) first.")
        E, (P, T, V) = self._embedding, self.logits.shape
        flat = self.logits.reshape(P * T, V)  # a view of the parameter
        index = None  # rows of `flat` to use; None: all
        if rows is not None:
            rows = rows.to(flat.device)
            index = (rows[:, None] * T + torch.arange(T, device=flat.device)).reshape(-1)
        n = P * T if index is None else index.numel()
        tau = self.temperature if self.mode == "softmax" else None
        if n * V <= self.chunk_elements:  # small: plain autograd
            out = _mix(flat if index is None else flat[index], E, tau)
        else:
            out = _ChunkedMix.apply(flat, E, tau, max(1, self.chunk_elements // V), index)
        return out.reshape(-1, T, E.shape[1])

    def temperature_at(self, step: int, max_steps: int) -> float:
        """T after `step` of `max_steps` steps: `temperature` at 0, `temperature_end` at the end."""
        t0, t1 = self.temperature_start, self.temperature_end
        if t1 is None:
            return t0
        if max_steps < 1:
            raise FeatoptError(f"a temperature schedule needs a positive max_steps, got {max_steps}.")
        f = min(max(step / max_steps, 0.0), 1.0)
        return t0 + (t1 - t0) * f if self.schedule == "linear" else t0 * (t1 / t0) ** f

    def set_step(self, step: int, max_steps: int) -> None:
        """Set the current T from the step count alone (what a resumed run calls first)."""
        self.temperature = self.temperature_at(step, max_steps)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        self.set_step(step, max_steps)
        if self.mode != "projected":
            return
        # a <- softmax(a / T), in place and in blocks of rows so no full-size float copy is made.
        flat = self.logits.data.reshape(-1, self.logits.shape[-1])
        block = max(1, self.chunk_elements // flat.shape[1])
        for chunk in flat.split(block):
            chunk.copy_(torch.softmax(chunk.float() / self.temperature, dim=-1))

    def probs(self, rows: Tensor | None = None) -> Tensor:
        """Token probabilities `[rows, tokens, vocab]` (for soft targets such as `fluency(soft=...)`)."""
        a = self.logits if rows is None else self.logits[rows]
        return a.float() if self.mode == "projected" else torch.softmax(a.float() / self.temperature, dim=-1)

    def direct_ids(self) -> Tensor:
        """The simplex decoding: the most probable token per position, `[problems, tokens]`."""
        return self.logits.detach().argmax(dim=-1)


def _mix(a: Tensor, E: Tensor, tau: float | None) -> Tensor:
    """`a [N, V]` -> `[N, d]`: softmax(a / tau) @ E, or a @ E when tau is None (projected)."""
    if tau is not None:
        a = torch.softmax(a.float() / tau, dim=-1)
    return a.to(E.dtype) @ E


class _ChunkedMix(torch.autograd.Function):
    """`_mix` over blocks of `block` rows of `flat [N, V]` (rows `index`, None: all). The backward
    recomputes each block's softmax and writes its gradient into one `[N, V]` tensor, so no
    full-size intermediate exists besides the parameter's own gradient."""

    @staticmethod
    def forward(ctx, flat, E, tau, block, index):
        ctx.save_for_backward(flat, E, index)
        ctx.tau, ctx.block = tau, block
        return torch.cat([_mix(flat[sel], E, tau) for sel in _blocks(flat.shape[0], block, index)])

    @staticmethod
    def backward(ctx, grad_out):
        flat, E, index = ctx.saved_tensors
        grad = torch.zeros_like(flat)
        for sel, g in zip(_blocks(flat.shape[0], block := ctx.block, index), grad_out.split(block)):
            gw = g.to(E.dtype) @ E.T  # d loss / d weights, [block, V]
            if ctx.tau is not None:  # through the softmax: w * (gw - <w, gw>) / tau
                w = torch.softmax(flat[sel].float() / ctx.tau, dim=-1)
                gw = gw.float()
                gw -= (w.unsqueeze(1) @ gw.unsqueeze(2)).squeeze(2)
                gw.mul_(w).div_(ctx.tau)
                del w
            grad[sel] = gw.to(grad.dtype)  # rows are distinct: a write, not a sum
        return grad, None, None, None, None


def _blocks(n: int, block: int, index: Tensor | None) -> list:
    """Row selectors of `block` rows: slices (views, no copy) for all rows, else index chunks."""
    if index is None:
        return [slice(s, s + block) for s in range(0, n, block)]
    return list(index.split(block))
