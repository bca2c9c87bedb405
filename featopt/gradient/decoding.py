"""Decode (optimized) input embeddings back to token ids.

``E: [V, d]`` is the embedding matrix (row v embeds token v, so a one-hot ``a`` embeds as
``e = E^T a``). Two decoders map ``embeds: [..., d]`` to ids ``[...]``:

* pseudoinverse (:class:`PinvDecoder`): ``a = (E^T)^+ e = E (E^T E)^+ e``, id = argmax_v a_v;
* nearest cosine neighbour (:func:`nearest_decode`): id = argmax_v cos(E_v, e).

Numerics. The Gram ``G = E^T E`` [d, d] is summed in float64 over chunks of rows (never a
float64 copy of E) and ``G^+`` comes from ``eigh``, dropping eigenvalues below
``max(V, d) * eps64 * max eigenvalue`` (numpy's pinv rule, applied to G: a relative cutoff,
so rank-deficient E works). ``G^+`` stays float64: G squares the condition number of E, and a
float32 ``G^+`` could put a relative error of cond(E)^2 * 6e-8 into ``z = G^+ e``. z is
computed in float64 (d x d per query: tiny). Only the big product ``E @ z``, over the
vocabulary in chunks with a running max, runs in float32 (float64 for float64 E) with TF32
switched off; E itself is float32 or coarser, so float32 adds no error that matters.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from featopt import cache
from featopt.errors import FeatoptError

_FORMAT = "featopt-pinv-v1"  # hashed into the disk key: bump it when the cutoff rule changes
_FILE = "gram_pinv.safetensors"
_ELEMS = 1 << 25  # entries per temporary block (128 MiB of float32): bounds every chunked loop
_MEMORY_SLOTS = 2  # each entry holds a float64 [d, d] (128 MiB at d=4096), so keep few
_memory: collections.OrderedDict = collections.OrderedDict()


def _check(embedding: Tensor, embeds: Tensor | None = None, chunk: int = 1) -> None:
    if embedding.dim() != 2 or not embedding.is_floating_point():
        raise FeatoptError(f"embedding must be a float [vocab, d_model] matrix, got {embedding.dtype} {tuple(embedding.shape)}")
    if embeds is not None and (embeds.dim() < 1 or embeds.shape[-1] != embedding.shape[1]):
        raise FeatoptError(f"embeds must end in d_model={embedding.shape[1]}, got shape {tuple(embeds.shape)}")
    if chunk < 1:
        raise FeatoptError(f"chunk must be a positive number of vocabulary rows, got {chunk}")


def _work_dtype(embedding: Tensor) -> torch.dtype:
    return torch.float64 if embedding.dtype == torch.float64 else torch.float32


def _f64_device(embedding: Tensor) -> torch.device:
    # MPS has no float64: the small [d, d] algebra then runs on the CPU.
    return torch.device("cpu") if embedding.device.type == "mps" else embedding.device


@contextlib.contextmanager
def _full_fp32_matmul():
    """TF32 (a 10-bit mantissa, which Lightning may switch on) could flip close argmaxes."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@torch.no_grad()
def _chunked_argmax(embedding: Tensor, queries: Tensor, chunk: int, cosine: bool) -> Tensor:
    """argmax_v E_v . q (over |E_v| if ``cosine``): queries [Q, d] -> [Q] long on E's device.

    ``chunk`` vocabulary rows at a time, queries in blocks of at most ``_ELEMS`` scores; a running
    (max, index) merges chunks, strict ``>`` keeping the first index on ties like one argmax."""
    wd, dev = _work_dtype(embedding), embedding.device
    queries = queries.to(dev, wd)
    best = torch.full((queries.shape[0],), float("-inf"), dtype=wd, device=dev)
    ids = torch.zeros(queries.shape[0], dtype=torch.long, device=dev)
    block = max(1, _ELEMS // chunk)
    with _full_fp32_matmul():
        for start in range(0, embedding.shape[0], chunk):
            rows = embedding[start:start + chunk].to(wd)  # [c, d]: the only copy of E made
            if cosine:  # |e| is the same for every v, so only the rows need normalizing
                rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            for q in range(0, queries.shape[0], block):
                val, idx = (queries[q:q + block] @ rows.T).max(dim=1)
                better = val > best[q:q + block]
                best[q:q + block] = torch.where(better, val, best[q:q + block])
                ids[q:q + block] = torch.where(better, idx + start, ids[q:q + block])
    return ids


@torch.no_grad()
def compute_gram_pinv(embedding: Tensor, rtol: float | None = None) -> Tensor:
    """(E^T E)^+ as float64 [d, d] for E [V, d]; eigenvalues <= rtol * max eigenvalue count as zero."""
    _check(embedding)
    vocab, d = embedding.shape
    dev = _f64_device(embedding)
    gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
    step = max(1, _ELEMS // (2 * d))  # float64 rows: 8 bytes per entry
    for start in range(0, vocab, step):
        rows = embedding[start:start + step].detach().to(dev, torch.float64)
        gram.addmm_(rows.T, rows)
    w, vecs = torch.linalg.eigh(gram)
    rtol = max(vocab, d) * torch.finfo(torch.float64).eps if rtol is None else rtol
    keep = w > rtol * w.max().clamp_min(0)
    inv = torch.where(keep, w.reciprocal(), torch.zeros_like(w))
    gram_pinv = (vecs * inv) @ vecs.T
    return (gram_pinv + gram_pinv.T) / 2  # exactly symmetric, so e^T G^+ = (G^+ e)^T in _z


class PinvDecoder:
    """Moore-Penrose decoding ``argmax_v (E G^+ e)_v`` with G^+ = (E^T E)^+ computed once."""

    def __init__(self, embedding: Tensor, gram_pinv: Tensor | None = None) -> None:
        """embedding [V, d]; gram_pinv [d, d] (e.g. from the cache) or None to compute it."""
        _check(embedding)
        self.embedding = embedding.detach()
        d = embedding.shape[1]
        if gram_pinv is None:
            gram_pinv = compute_gram_pinv(self.embedding)
        if tuple(gram_pinv.shape) != (d, d):
            raise FeatoptError(f"gram_pinv must be [{d}, {d}], got {tuple(gram_pinv.shape)}")
        self.gram_pinv = gram_pinv.to(_f64_device(embedding), torch.float64)  # [d, d]

    def _z(self, embeds: Tensor) -> Tensor:
        """z = G^+ e in float64, returned as [Q, d] in the work dtype on E's device."""
        d = self.embedding.shape[1]
        flat = embeds.detach().reshape(-1, d)
        out = torch.empty(flat.shape[0], d, dtype=_work_dtype(self.embedding), device=self.embedding.device)
        step = max(1, _ELEMS // (2 * d))
        for q in range(0, flat.shape[0], step):  # G^+ is symmetric: rows e^T G^+ = (G^+ e)^T
            out[q:q + step] = flat[q:q + step].to(self.gram_pinv.device, torch.float64) @ self.gram_pinv
        return out

    def decode(self, embeds: Tensor, chunk: int = 8192) -> Tensor:
        """embeds [..., d] -> token ids [...] (long, on embeds' device); ``chunk`` vocab rows a step."""
        _check(self.embedding, embeds, chunk)
        ids = _chunked_argmax(self.embedding, self._z(embeds), chunk, cosine=False)
        return ids.reshape(embeds.shape[:-1]).to(embeds.device)

    @torch.no_grad()
    def scores(self, embeds: Tensor) -> Tensor:
        """Full pseudoinverse scores [..., d] -> [..., V]: memory Q x V, so small inputs only."""
        _check(self.embedding, embeds)
        with _full_fp32_matmul():
            s = self._z(embeds) @ self.embedding.to(_work_dtype(self.embedding)).T
        return s.reshape(*embeds.shape[:-1], self.embedding.shape[0]).to(embeds.device)


def nearest_decode(embedding: Tensor, embeds: Tensor, chunk: int = 8192) -> Tensor:
    """Nearest cosine neighbour: E [V, d], embeds [..., d] -> ids [...] long on embeds' device."""
    _check(embedding, embeds, chunk)
    ids = _chunked_argmax(embedding.detach(), embeds.detach().reshape(-1, embedding.shape[1]), chunk, cosine=True)
    return ids.reshape(embeds.shape[:-1]).to(embeds.device)


def token_cosine(embedding: Tensor, embeds: Tensor, ids: Tensor) -> Tensor:
    """cos(embeds[p, t], E[ids[p, t]]): E [V, d], embeds [P, T, d], ids [P, T] -> [P, T] (any [...])."""
    _check(embedding, embeds)
    wd = torch.promote_types(embeds.dtype, torch.float32)
    tokens = embedding[ids.to(embedding.device)].to(embeds.device, wd)
    return F.cosine_similarity(embeds.to(wd), tokens, dim=-1)


def agreement(a: Tensor, b: Tensor) -> Tensor:
    """Fraction of positions where two decodings agree: ids [P, T] and [P, T] -> [P] float."""
    if a.shape != b.shape:
        raise FeatoptError(f"decodings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a == b.to(a.device)).float().mean(dim=-1)


@torch.no_grad()
def fingerprint(embedding: Tensor) -> str:
    """blake2b of shape, dtype, 64 strided rows and each row's sum of its 16-bit words.

    Integer sums are exact and order-free, so the key is the same on every device."""
    vocab, d = embedding.shape
    h = hashlib.blake2b(f"{_FORMAT}|{vocab}x{d}|{embedding.dtype}".encode(), digest_size=20)
    h.update(embedding[_rows(embedding, 64)].contiguous().view(torch.int16).cpu().numpy().tobytes())
    step = max(1, (1 << 23) // d)
    sums = [embedding[s:s + step].contiguous().view(torch.int16).sum(dim=1, dtype=torch.int64)
            for s in range(0, vocab, step)]
    h.update(torch.cat(sums).cpu().numpy().tobytes())
    return h.hexdigest()


def _rows(embedding: Tensor, n: int) -> Tensor:
    """Indices of n rows spread evenly over the vocabulary."""
    return torch.linspace(0, embedding.shape[0] - 1, min(embedding.shape[0], n), device=embedding.device).long()


def _probe(embedding: Tensor) -> Tensor:
    """16 rows: a cheap check that a memory-cache hit is not a new tensor at a freed address."""
    return embedding[_rows(embedding, 16)].clone()


def _cached_gram_pinv(folder: Path, emb: Tensor) -> Tensor:
    """G^+ of E from the cache entry `folder` (see :func:`featopt.cache.entry`: written atomically,
    checked on read, rebuilt when corrupt), computing and storing it when missing."""
    computed: list[Tensor] = []

    def build(tmp: Path) -> None:
        computed.append(compute_gram_pinv(emb))
        save_file({"gram_pinv": computed[0].cpu().contiguous()}, str(tmp / _FILE), metadata={"format": _FORMAT})

    try:
        cache.entry(folder, build)
        if computed:
            return computed[0]
        gram_pinv = load_file(str(folder / _FILE))["gram_pinv"]
        if tuple(gram_pinv.shape) == (emb.shape[1],) * 2 and gram_pinv.dtype == torch.float64:
            return gram_pinv
        warnings.warn(f"ignoring the pinv cache entry {folder}: it holds {gram_pinv.dtype} {tuple(gram_pinv.shape)}")
    except OSError as exc:  # a read-only or full disk must not stop decoding
        warnings.warn(f"could not use the pinv cache {folder}: {exc}")
    return computed[0] if computed else compute_gram_pinv(emb)


def clear_memory_cache() -> None:
    """Forget every in-memory G^+ (tests; or to free its device memory)."""
    _memory.clear()


def pinv_decoder(embedding: Tensor, cache_dir: str | Path | None = None) -> PinvDecoder:
    """A :class:`PinvDecoder` for E [V, d], with G^+ cached in memory and optionally on disk.

    Memory: keyed on the tensor (data_ptr, shape, stride, dtype, device) and valid only for the
    same ``E._version`` (an in-place edit invalidates) and the same 16 probe rows. Edits made
    through ``E.data`` do not bump the version; the probe catches most of them, not all.
    Disk: ``<cache_dir or $FEATOPT_CACHE>/pinv/<fingerprint>/gram_pinv.safetensors``; with neither set
    nothing is written (a library should not fill the home folder unasked; see
    :func:`featopt.cache.cache_dir`).
    """
    _check(embedding)
    emb = embedding.detach()
    key = (emb.data_ptr(), tuple(emb.shape), emb.stride(), emb.dtype, str(emb.device))
    hit = _memory.get(key)
    if hit is not None and hit[0] == emb._version and torch.equal(hit[1], _probe(emb)):
        _memory.move_to_end(key)
        return PinvDecoder(emb, hit[2])
    folder = cache_dir if cache_dir is not None else os.environ.get("FEATOPT_CACHE") or None
    if folder is None:
        gram_pinv = compute_gram_pinv(emb)
    else:
        gram_pinv = _cached_gram_pinv(Path(folder) / "pinv" / fingerprint(emb), emb)
    gram_pinv = gram_pinv.to(_f64_device(emb))
    _memory[key] = (emb._version, _probe(emb), gram_pinv)
    _memory.move_to_end(key)
    while len(_memory) > _MEMORY_SLOTS:
        _memory.popitem(last=False)
    return PinvDecoder(emb, gram_pinv)
