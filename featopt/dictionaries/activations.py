"""Activations for SAE training: from the frozen model (early exit at the deepest site) or from a
cache on disk, mixed across many contexts by a shuffling buffer.

The stream is a pure function of the step index: buffer `g` holds the contexts `g*C .. g*C+C-1`
of a sequence of seeded per-epoch permutations of the corpus, and its rows (one per token after
the first `skip_first` positions) are drawn in a seeded permutation, `batch_tokens` per step.
So a resumed run re-creates exactly the buffer it stopped in, a run from the cache sees exactly
what a run from the model sees, and K processes split every global batch between them: rank r
runs the model only on the buffer's contexts `j` with `j % K == r` and takes the rows of each
batch that come from them (the loss is a sum over rows divided by the global batch size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site

CACHE_META = "activations.json"


class ModelSource:
    """Activations `{site: [C, T, d]}` of contexts by one forward that stops at the deepest site."""

    def __init__(self, adapter: ModelAdapter, contexts: Tensor, sites: Sequence[Site], batch_contexts: int = 16):
        self.adapter, self.contexts, self.sites = adapter, contexts, list(sites)
        self.batch_contexts = batch_contexts

    @property
    def n_contexts(self) -> int:
        return self.contexts.shape[0]

    @property
    def token_bytes(self) -> int:
        """CPU bytes one token's activations take in a buffer (float32 at every site, and the copy
        made when a buffer is sliced into rows)."""
        return 2 * 4 * sum(self.adapter.width(site) for site in self.sites)

    @torch.inference_mode()
    def __call__(self, index: Tensor) -> dict[Site, Tensor]:
        parts: dict[Site, list[Tensor]] = {site: [] for site in self.sites}
        for chunk in index.split(self.batch_contexts):
            acts = self.adapter.run(self.sites, input_ids=self.contexts[chunk])
            for site in self.sites:
                parts[site].append(acts[site].float().cpu())
        return {site: torch.cat(parts[site]) if parts[site] else torch.zeros(0) for site in self.sites}


class CacheSource:
    """Activations read from a cache written by :func:`write_cache` (held in memory once read)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        meta_path = self.folder / CACHE_META
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise FeatoptError(f"{str(folder)!r} is not a featopt activation cache (no readable {CACHE_META}): "
                               "make one with `featopt sae cache`.") from None
        self.sites = [Site(int(s.split(".")[1]), s.split(".")[2]) for s in self.meta["sites"]]
        parts: dict[Site, list[Tensor]] = {site: [] for site in self.sites}
        try:
            for shard in self.meta["shards"]:
                with safe_open(str(self.folder / shard), framework="pt") as f:
                    for site in self.sites:
                        parts[site].append(f.get_tensor(site.name))
        except Exception as error:  # noqa: BLE001 - any unreadable shard is the same user-facing problem
            raise FeatoptError(f"the activation cache {str(folder)!r} is incomplete or corrupt ({error.__class__.__name__}): "
                               "write it again with `featopt sae cache`.") from None
        self.acts = {site: torch.cat(parts[site]) for site in self.sites}
        n = {tuple(a.shape[:2]) for a in self.acts.values()}
        if n != {tuple(self.meta["contexts_shape"])}:
            raise FeatoptError(f"the activation cache {str(folder)!r} holds {n} rows, not the {self.meta['contexts_shape']} "
                               "its metadata promises: write it again.")

    @property
    def n_contexts(self) -> int:
        return self.meta["contexts_shape"][0]

    def __call__(self, index: Tensor) -> dict[Site, Tensor]:
        return {site: self.acts[site][index].float() for site in self.sites}


def model_source(adapter: ModelAdapter, *, contexts: Tensor, sites: Sequence[Site]) -> ModelSource:
    """The stream's source from the model (picklable through `functools.partial`, for spawned workers)."""
    return ModelSource(adapter, contexts, sites)


_CACHES: dict[str, CacheSource] = {}


def cached_source(folder: str, adapter: ModelAdapter | None = None) -> CacheSource:
    """The stream's source from a cache folder, read once per process."""
    key = str(Path(folder).resolve())
    if key not in _CACHES:
        _CACHES[key] = CacheSource(folder)
    return _CACHES[key]


def write_cache(source: ModelSource, out: str | Path, meta: dict, *, shard_contexts: int = 256, progress: bool = True) -> Path:
    """Every context's activations at the source's sites, as safetensors shards in context order,
    plus `activations.json`. Written into a temporary sibling folder and renamed into place."""
    import shutil
    import tempfile

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise FeatoptError(f"the cache folder {str(out)!r} already exists: give a new folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shards = []
        n = source.n_contexts
        bar = tqdm(total=n * source.contexts.shape[1], unit="tok", desc="caching", disable=not progress)
        for s, start in enumerate(range(0, n, shard_contexts)):
            index = torch.arange(start, min(n, start + shard_contexts))
            acts = source(index)
            name = f"shard_{s:05d}.safetensors"
            save_file({site.name: a.contiguous() for site, a in acts.items()}, str(tmp / name))
            shards.append(name)
            bar.update(len(index) * source.contexts.shape[1])
        bar.close()
        document = {**meta, "sites": [s.name for s in source.sites], "contexts_shape": list(source.contexts.shape),
                    "shards": shards, "dtype": "float32"}
        (tmp / CACHE_META).write_text(json.dumps(document, indent=2))
        torch.save(source.contexts, tmp / "contexts.pt")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class ActivationStream:
    """Training batches as a pure function of the step (see the module docstring).

    Args:
        source: gives `{site: [C, T, d]}` for context indices `[C]`.
        n_contexts, context_length: the corpus' contexts `[N, T]`.
        batch_tokens: rows per global batch `B`.
        buffer_batches: batches drawn from one buffer `M` (its contexts: enough for `M * B` rows).
        skip_first: leading positions of every context left out (position 0 is an attention sink
            with an outlying norm on many models).
    """

    def __init__(self, source, n_contexts: int, context_length: int, *, batch_tokens: int, buffer_batches: int = 16,
                 seed: int = 0, skip_first: int = 1, world: int = 1, rank: int = 0):
        self.source, self.n, self.seed = source, n_contexts, seed
        self.rows_per_context = context_length - skip_first
        if self.rows_per_context < 1:
            raise FeatoptError(f"contexts of {context_length} tokens leave no position after skipping {skip_first}: use longer contexts.")
        self.skip_first, self.batch_tokens, self.buffer_batches = skip_first, batch_tokens, buffer_batches
        self.contexts_per_buffer = math.ceil(buffer_batches * batch_tokens / self.rows_per_context)
        self.world, self.rank = world, rank
        self._g: int | None = None
        self._epoch_perm: dict[int, Tensor] = {}

    def _epoch_order(self, epoch: int) -> Tensor:
        if epoch not in self._epoch_perm:
            self._epoch_perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}
        return self._epoch_perm[epoch]

    def buffer_contexts(self, g: int) -> Tensor:
        """Context indices `[C]` of buffer g (epochs follow one another without a gap)."""
        q = torch.arange(g * self.contexts_per_buffer, (g + 1) * self.contexts_per_buffer)
        out = torch.empty_like(q)
        for epoch in q.div(self.n, rounding_mode="floor").unique().tolist():
            at = q.div(self.n, rounding_mode="floor") == epoch
            out[at] = self._epoch_order(epoch)[q[at] % self.n]
        return out

    def _refill(self, g: int) -> None:
        contexts = self.buffer_contexts(g)
        C, R = len(contexts), self.rows_per_context
        mine_ctx = torch.arange(C) % self.world == self.rank
        if hasattr(self.source, "token_bytes"):  # checked before the forward: the OOM killer gives no error to catch
            memory.check(int(mine_ctx.sum()) * (R + self.skip_first) * self.source.token_bytes, "cpu",
                         flag="--buffer_batches or --batch_size", what="the SAE training buffer")
        acts = self.source(contexts[mine_ctx])
        self._acts = {site: a[:, self.skip_first:].reshape(-1, a.shape[-1]) for site, a in acts.items()}
        self._row_rank = (torch.arange(C) % self.world).repeat_interleave(R)  # [C * R] whose contexts, per row
        self._owner = self._row_rank == self.rank
        self._local = torch.cumsum(self._owner.long(), 0) - 1
        gen = torch.Generator().manual_seed(self.seed * 7_919 + g + 1)
        self._perm = torch.randperm(C * R, generator=gen)[: self.buffer_batches * self.batch_tokens]
        self._g = g
        if hasattr(self.source, "prefetch"):  # the next buffer's forward runs while this one trains (prefetch.py)
            following = self.buffer_contexts(g + 1)
            self.source.prefetch(following[torch.arange(len(following)) % self.world == self.rank])

    def batch(self, step: int) -> dict[Site, Tensor]:
        """This rank's rows of global batch `step`: `{site: [rows, d]}` (rows <= batch_tokens)."""
        g, i = divmod(step, self.buffer_batches)
        if self._g != g:
            self._refill(g)
        sel = self._perm[i * self.batch_tokens:(i + 1) * self.batch_tokens]
        local = self._local[sel[self._owner[sel]]]
        return {site: a[local] for site, a in self._acts.items()}

    def batch_ranks(self, step: int) -> Tensor:
        """The rank whose contexts give each row of global batch `step`, `[batch_tokens]` in the
        global batch's order: rank r's rows of :meth:`batch` are, in order, those where it is r."""
        g, i = divmod(step, self.buffer_batches)
        if self._g != g:
            self._refill(g)
        return self._row_rank[self._perm[i * self.batch_tokens:(i + 1) * self.batch_tokens]]
