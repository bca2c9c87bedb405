"""A relu or topk SAE sharded over its latents across the K ranks of a device mesh (the training
face of a dictionary too wide for one device: 1M latents over a 4096-wide site are 32 GB of
weights and 64 GB of Adam state).

Rank r holds the latents `r m .. (r + 1) m - 1`, `m = d_sae / K`: its columns of `W_enc [d_in, m]`
and `b_enc [m]`, its rows of `W_dec [m, d_out]`, each a DTensor `Shard`ed over the latent dimension,
and `b_dec [d_out]` `Replicate`d. Every rank reads the same global batch `x [n, d_in]`:

- pre-activations are local, `[n, m]`; relu is local; topk keeps each row's global k largest:
  every rank proposes its local k largest, the values `[n, K k]` are all-gathered and the k
  largest of them kept (:func:`keep_among`), no indices exchanged (the gathered columns are in
  latent order);
- the decode is each rank's partial sum over its latents, all-reduced, plus `b_dec`;
- every rank computes the whole loss (FVU, relu's L1, topk's AuxK), so that the gradient of a
  rank's own latents is its local one. Hence :class:`_ReduceFromShards` (all-reduce forward,
  identity backward), not `torch.distributed.nn.functional.all_reduce`, whose backward all-reduces
  the K identical incoming gradients, K times the true one; and :class:`_CopyToShards` (identity
  forward, all-reduce backward) where the replicated `b_dec` enters the encoder's centring, whose
  gradient is a partial sum over each rank's latents. `b_dec`'s gradient is then the same on every
  rank, and the optimizer (Adam state sharded like its parameters) keeps it replicated.

Per step and SAE the ranks exchange `[n, k]` values (topk) and all-reduce an `[n, d_out]` partial
decode (twice with AuxK, which exchanges `[n, d_out / 2]` values), a scalar and `[d_in]` backward.

Ties at the cut (topk, AuxK): the lower latent index is kept, in each rank's proposal and in the
global choice, so the kept set does not depend on K. The unsharded :class:`TopKSAE` keeps whichever
of the tied `torch.topk` returns (unspecified; on CPU often the higher); the two keep the same
latents whenever a row's k-th and (k+1)-th largest pre-activations differ, and a tie at a cut of
0 or below changes nothing (relu zeroes both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from featopt.errors import FeatoptError
from featopt.models.sae.model import SAEConfig, SparseAutoencoder, architecture
from featopt.models.sae.selection import row_topk_pairs
from featopt.models.sae.sparse_step import KeptPairs, decode_pairs, gather_pre, preacts_buffer, squared_error
from featopt.models.sae.training_parts import LossTerms

#: The architectures that shard (their latents interact only through topk's row-wise choice).
SHARDED_ARCHITECTURES = ("relu", "topk")
_INIT_ROWS = 4096  # decoder rows drawn per chunk at init: a multiple of 16, so chunks draw what one call would
_GATHER_ELEMENTS = 1 << 24  # elements per rank and piece when the whole SAE is gathered (64 MB of float32)


class _ReduceFromShards(torch.autograd.Function):
    """Sum over ranks forward; identity backward (every rank holds the whole loss)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Identity forward; sum over ranks backward (each rank's use of a replicated tensor is partial)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def top_candidates(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`(cols [n, kk], values [n, kk])`: the `kk = min(k, m)` largest of each row of `pre [n, m]`,
    columns ascending; ties at the cut keep the lower columns."""
    n, m = pre.shape
    kk = min(k, m)
    if kk == 0:
        return pre.new_zeros((n, 0), dtype=torch.long), pre.new_zeros((n, 0))
    _, cols, values = row_topk_pairs(pre, kk)
    cols, values = cols.view(n, kk), values.view(n, kk)
    cut = values.amin(1, keepdim=True)
    tied = (pre >= cut).sum(1) > kk  # rows with more entries at or above the cut than kept: a tie at it
    if bool(tied.any()):
        sub = pre[tied]
        keep = keep_among(sub, kk)
        r, c = keep.nonzero(as_tuple=True)  # row-major: kk per row, columns ascending
        cols[tied], values[tied] = c.view(-1, kk), sub[r, c].view(-1, kk)
    cols, order = cols.sort(1)
    return cols, values.gather(1, order)


def keep_among(values: Tensor, k: int) -> Tensor:
    """`[n, c]` bool: the k largest of each row of `values [n, c]`, ties at the cut broken towards
    the lower column (exactly k per row)."""
    cut = values.topk(k, dim=1).values[:, -1:]
    above = values > cut
    tied = values == cut
    need = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= need))


class ShardedSAE(nn.Module):
    """Rank `mesh.get_local_rank()`'s share of an SAE of config `cfg` (relu or topk, not a
    transcoder) on the 1-d `mesh`; `d_sae` must divide by the mesh's size. The parameters are
    DTensors (see the module docstring); created zero: :meth:`init_weights` draws the same start
    as :meth:`SparseAutoencoder.init_weights` under the same generator."""

    unit_decoder = True
    is_transcoder = False

    def __init__(self, cfg: SAEConfig, mesh, device: torch.device | str = "cpu"):
        super().__init__()
        from torch.distributed.tensor import DTensor, Replicate, Shard

        check_shardable(cfg, mesh.size())
        self.cfg, self.mesh, self.group = cfg, mesh, mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        m, d_in, d_out = self.d_local, cfg.d_in, cfg.d_out

        def param(shape, placement):
            return nn.Parameter(DTensor.from_local(torch.zeros(shape, device=device), mesh, [placement], run_check=False))

        self.W_enc = param((d_in, m), Shard(1))
        self.b_enc = param((m,), Shard(0))
        self.W_dec = param((m, d_out), Shard(0))
        self.b_dec = param((d_out,), Replicate())

    def label(self) -> str:
        """Its architecture's settings as a name part, as :meth:`SparseAutoencoder.label` (topk: `-k32`)."""
        return "".join(f"-{name}{getattr(self.cfg, name)}" for name in architecture(self.cfg.architecture).settings)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        """All latents, over every rank."""
        return self.cfg.d_sae

    @property
    def d_local(self) -> int:
        """This rank's latents."""
        return self.cfg.d_sae // self.world

    @property
    def offset(self) -> int:
        """This rank's first latent."""
        return self.rank * self.d_local

    def local(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(W_enc [d_in, m], b_enc [m], W_dec [m, d_out], b_dec [d_out])`, this rank's tensors; differentiable."""
        return self.W_enc.to_local(), self.b_enc.to_local(), self.W_dec.to_local(), self.b_dec.to_local()

    # ----------------------------------------------------------------- the training start and steps
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, data_mean: Tensor | None = None,
                     input_mean: Tensor | None = None) -> None:
        """:meth:`SparseAutoencoder.init_weights`'s start, this rank's share of it: every rank draws
        the `[d_sae, d_in]` rows in chunks (the same numbers one call draws) and keeps its own."""
        W_enc, b_enc, W_dec, b_dec = self.local()
        lo, hi = self.offset, self.offset + self.d_local
        for start in range(0, self.d_sae, _INIT_ROWS):
            rows = torch.randn(min(_INIT_ROWS, self.d_sae - start), self.d_in, generator=generator, dtype=torch.float32)
            a, b = max(lo, start), min(hi, start + len(rows))
            if a < b:
                W = rows[a - start:b - start]
                W = (W / W.norm(dim=1, keepdim=True)).to(W_dec.device)
                W_dec[a - lo:b - lo] = W
                W_enc[:, a - lo:b - lo] = W.T
        b_enc.zero_()
        b_dec.copy_(data_mean if data_mean is not None else torch.zeros(self.cfg.d_out))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """This rank's decoder rows back to unit norm (a row's norm is local to its rank)."""
        W = self.W_dec.to_local()
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """:meth:`SparseAutoencoder.remove_parallel_grads` on this rank's rows."""
        if self.W_dec.grad is None:
            return
        W, grad = self.W_dec.to_local(), self.W_dec.grad.to_local()
        along = torch.linalg.vecdot(grad, W) / torch.linalg.vecdot(W, W).clamp_min(1e-16)
        grad.addcmul_(W, along[:, None], value=-1)

    def after_step(self) -> None:
        """Nothing to keep in shape besides the decoder rows."""

    def observe_batch(self, stats: dict, reduce) -> None:
        """No running state (batchtopk's threshold does not shard)."""

    # ----------------------------------------------------------------- the loss
    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms, y: Tensor | None = None) -> tuple[Tensor, dict]:
        """The unsharded architecture's loss on the global batch `x [n, d_in]`, the same number on
        every rank; stats: `fvu` (summed squared error), `l0` (this rank's nonzero latents) and
        `fired` (`[m]`, this rank's latents)."""
        if y is not None:
            raise FeatoptError("a latent-sharded SAE reconstructs its own input: train transcoders without --shard_latents.")
        x = x.to(self.W_enc.dtype)
        W_enc, b_enc, W_dec, b_dec = self.local()
        c = b_enc - _CopyToShards.apply(b_dec, self.group) @ W_enc  # [m]: the centring on the bias
        if self.cfg.architecture == "relu":
            return self._relu_loss(x, W_enc, c, W_dec, b_dec, total_var, terms)
        return self._topk_loss(x, W_enc, c, W_dec, b_dec, total_var, terms)

    def _reduce(self, t: Tensor) -> Tensor:
        return _ReduceFromShards.apply(t, self.group)

    def _relu_loss(self, x, W_enc, c, W_dec, b_dec, total_var, terms) -> tuple[Tensor, dict]:
        z = torch.addmm(c, x, W_enc).relu()  # [n, m]
        x_hat = self._reduce(z @ W_dec) + b_dec  # [n, d_in]
        sq = (x - x_hat).pow(2).sum()
        zsum = z.sum(0)  # [m]
        l1 = self._reduce((zsum * W_dec.norm(dim=1)).sum())
        loss = (sq + terms.l1 * l1) / total_var
        l0 = torch.count_nonzero(z.detach()).double() if terms.count else x.new_zeros((), dtype=torch.float64)
        return loss, {"fvu": sq.detach(), "l0": l0, "fired": zsum.detach() > 0}

    def _topk_loss(self, x, W_enc, c, W_dec, b_dec, total_var, terms) -> tuple[Tensor, dict]:
        with torch.no_grad():  # the dense product once, without a graph; only kept pairs get one
            pre = torch.addmm(c, x, W_enc, out=preacts_buffer(len(x), self.d_local, x))
        pairs = self._global_pairs(pre, self.cfg.k, torch.arange(self.d_local, device=pre.device), pre)
        values = torch.relu(gather_pre(x, W_enc, c, pre, pairs))
        sq, e = squared_error(x, self._reduce(decode_pairs(pairs, values, W_dec)), b_dec)
        loss = sq / total_var
        active = values > 0
        fired = torch.bincount(pairs.cols, weights=active.to(values.dtype), minlength=self.d_local) > 0
        stats = {"fvu": sq.detach(), "l0": active.sum().detach().double(), "fired": fired}
        dead = terms.dead
        if terms.auxk_alpha > 0 and dead is not None:
            n_dead = dead.sum()
            dist.all_reduce(n_dead, group=self.group)  # every rank takes the same branch
            if int(n_dead) > 0:
                loss = loss + terms.auxk_alpha * self._auxk(pre, dead, int(n_dead), e, x, W_enc, c, W_dec) / total_var
        return loss, stats

    def _global_pairs(self, pre: Tensor, k: int, ids: Tensor, sub: Tensor) -> KeptPairs:
        """This rank's pairs among each row's global k largest of the columns `ids [c]` of `pre
        [n, m]` (`sub = pre[:, ids]`; `ids` ascending), over every rank's such columns."""
        cols, values = top_candidates(sub, k)
        n, kk = values.shape
        if kk < k:  # too few columns here: pad, so that every rank sends [n, k]
            values = torch.cat([values, values.new_full((n, k - kk), float("-inf"))], 1)
        parts = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(parts, values.contiguous(), group=self.group)
        keep = keep_among(torch.cat(parts, 1), k)[:, self.rank * k:self.rank * k + kk]  # latent order: rank-major
        rows, slots = keep.nonzero(as_tuple=True)  # rows ascending
        return KeptPairs(rows, ids[cols[rows, slots]], n, self.d_local, values[rows, slots])

    def _auxk(self, pre, dead, n_dead, residual, x, W_enc, c, W_dec) -> Tensor:
        """:func:`~featopt.models.sae.sparse_step.auxk_loss` over every rank's dead latents."""
        half = residual.shape[-1] // 2
        k_aux, scale = min(half, n_dead), min(n_dead / half, 1.0)
        dead_ids = torch.nonzero(dead).flatten()
        pairs = self._global_pairs(pre, k_aux, dead_ids, pre.index_select(1, dead_ids))
        values = torch.relu(gather_pre(x, W_enc, c, pre, pairs))
        e_hat = self._reduce(decode_pairs(pairs, values, W_dec))
        return scale * (e_hat - residual.detach()).pow(2).sum()

    # ----------------------------------------------------------------- the whole SAE
    @torch.no_grad()
    def gather(self, dst: int = 0, point=None) -> SparseAutoencoder | None:
        """The whole SAE, on rank `dst` of the mesh (None elsewhere): an ordinary
        :class:`SparseAutoencoder` on the CPU, of the parameters or of `point(parameter)` (a
        DTensor alike: schedule-free's evaluation point). A collective: every rank calls it. The
        shares travel in pieces of at most `_GATHER_ELEMENTS` per rank, so that rank dst's device
        holds K pieces at a time, not a whole weight matrix."""
        out = SparseAutoencoder(self.cfg) if self.rank == dst else None
        to = dist.get_global_rank(self.group, dst)
        m = self.d_local
        for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0), ("b_dec", None)):
            value = getattr(self, name) if point is None else point(getattr(self, name))
            local = value.to_local().detach()
            if dim is None:  # replicated: rank dst's own
                if out is not None:
                    out.b_dec.copy_(local.cpu())
                continue
            whole = getattr(out, name) if out is not None else None
            step = max(1, _GATHER_ELEMENTS // max(1, local[0].numel()))  # leading rows per piece
            for a in range(0, len(local), step):
                piece = local[a:a + step].contiguous()
                parts = [torch.empty_like(piece) for _ in range(self.world)] if out is not None else None
                dist.gather(piece, parts, dst=to, group=self.group)
                for r, part in enumerate(parts or []):  # rank r's latents r m .. (r + 1) m - 1
                    if dim == 1:
                        whole[a:a + len(part), r * m:(r + 1) * m] = part.cpu()
                    else:
                        whole[r * m + a:r * m + a + len(part)] = part.cpu()
        return out

    @torch.no_grad()
    def load_full(self, sae: SparseAutoencoder) -> None:
        """Take this rank's share of the weights of an unsharded `sae` of the same config."""
        W_enc, b_enc, W_dec, b_dec = self.local()
        lo, hi = self.offset, self.offset + self.d_local
        W_enc.copy_(sae.W_enc[:, lo:hi])
        b_enc.copy_(sae.b_enc[lo:hi])
        W_dec.copy_(sae.W_dec[lo:hi])
        b_dec.copy_(sae.b_dec)

    def extra_repr(self) -> str:
        return f"{self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae} (rank {self.rank}: {self.d_local}), k={self.cfg.k}"


def check_shardable(cfg: SAEConfig, world: int) -> None:
    """Raise FeatoptError, one sentence, when an SAE of config `cfg` cannot shard over `world` ranks."""
    if cfg.architecture not in SHARDED_ARCHITECTURES:
        raise FeatoptError(f"a latent-sharded SAE is relu or topk, not {cfg.architecture}: train "
                           f"{cfg.architecture} SAEs without --shard_latents.")
    if cfg.target_hook_name or cfg.skip or not cfg.apply_b_dec_to_input:
        raise FeatoptError("a latent-sharded SAE reconstructs its own input: train transcoders without --shard_latents.")
    if cfg.d_sae % world:
        raise FeatoptError(f"--shard_latents splits the {cfg.d_sae} latents evenly over --devices {world}: give a d_sae "
                           f"divisible by {world}.")
    if cfg.architecture == "topk" and cfg.k > cfg.d_sae:
        raise FeatoptError(f"--k {cfg.k} is more than the {cfg.d_sae} latents of the SAE: give k <= d_sae.")
