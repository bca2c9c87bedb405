"""SAE weights read without a second copy: safetensors files through a private memory map, and
Gemma Scope's `params.npz` converted once into a cached safetensors file that is then mapped.

A pretrained dictionary is big (1M latents at width 2304: 18 GB of float32 encoder and decoder), so
the loaders never hold it twice. :func:`read_safetensors` parses the header itself (8-byte
little-endian length, then JSON) and makes each tensor with `torch.frombuffer` over one
`mmap.ACCESS_COPY` map of the file: pages are read lazily, nothing is ever written back, and an
in-place update (a training step) stays private to the process. Each tensor gets a storage of its
own bytes only, so pickling one (ddp_spawn) sends its values, not the whole file.
:func:`cast_each` converts to another dtype a block of rows at a time and drops each block's
source pages once converted, so the peak is the weights in the new dtype plus a block.

`.npz` members may be compressed, so they cannot be mapped: :func:`read_npz` converts the file once
into `$FEATOPT_CACHE/sae/` (keyed by the npz's absolute path, size and mtime), streaming each
member's bytes a block at a time (an array in another layout is read whole, one at a time), and
maps the result; later loads read only the npz's member headers, never its arrays.
"""

from __future__ import annotations

import hashlib
import json
import mmap as mmaps
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor

from featopt.cache import cache_dir, entry
from featopt.errors import FeatoptError

#: safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32,
          "U64": torch.uint64, "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_PAGE = mmaps.PAGESIZE
NPZ_CACHE = "npz"  # $FEATOPT_CACHE/sae/npz-<path key>-<version key>/params.safetensors
_NPZ_FORMAT = 1  # part of the cache key: a change of the converted layout makes new entries
CONVERTED = "params.safetensors"

#: `release(tensor)`: drop the resident pages of a mapped tensor that is no longer needed
Release = Callable[[Tensor], None]


def _unreadable(file: Path, why: str) -> NoReturn:
    raise FeatoptError(f"{file} is not a readable safetensors file ({why}): save the SAE again.")


# ----------------------------------------------------------------------------------------- safetensors
def _header(file: Path, f, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """The tensors of the open safetensors file `f` (`size` bytes) as `{name: (dtype, shape, offset)}`
    (offset: of its first byte in the file); FeatoptError for a file that is not one (truncated,
    garbled, overlapping or out-of-range tensors)."""
    head = f.read(8)
    if len(head) < 8:
        _unreadable(file, "shorter than its 8-byte header length")
    length = int.from_bytes(head, "little")
    if length > _MAX_HEADER or 8 + length > size:
        _unreadable(file, f"a header of {length} bytes in a file of {size}")
    try:
        doc = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        _unreadable(file, "its header is not JSON")
    if not isinstance(doc, dict):
        _unreadable(file, "its header is not a JSON object")
    start, out, spans = 8 + length, {}, []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            valid = all(type(n) is int and n >= 0 for n in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            _unreadable(file, f"tensor {name!r} has no valid dtype, shape and data_offsets")
        if end - begin != _numel(shape) * dtype.itemsize or start + end > size:
            _unreadable(file, f"tensor {name!r} does not fit its bytes")
        out[name] = (dtype, shape, start + begin)
        spans.append((begin, end))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        _unreadable(file, "two tensors share bytes")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_safetensors(file: Path, *, mmap: bool = True) -> tuple[dict[str, Tensor], Release]:
    """The tensors of a safetensors file, and a `release` for :func:`cast_each`.

    `mmap`: each tensor is a view of a private copy-on-write map of the file (no bytes read until
    used; in-place changes never reach the file); else the file is read whole into memory, once.
    """
    file = Path(file)
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = _header(file, f, size)
            buffer = _map(f) if mmap else None
            if buffer is None:
                buffer = bytearray(size)
                f.seek(0)
                view, got = memoryview(buffer), 0
                while got < size and (n := f.readinto(view[got:])):
                    got += n
    except OSError as e:
        _unreadable(file, type(e).__name__)
    tensors = {name: _tensor(buffer, offset, dtype, shape) for name, (dtype, shape, offset) in header.items()}
    return tensors, (_releaser(buffer) if isinstance(buffer, mmaps.mmap) else _keep)


def _map(f) -> mmaps.mmap | None:
    """A private copy-on-write map of the open file `f`; None where its file system cannot map."""
    try:
        return mmaps.mmap(f.fileno(), 0, access=mmaps.ACCESS_COPY)
    except (OSError, ValueError):
        return None


def _tensor(buffer, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """`shape` of `dtype` at byte `offset` of `buffer`, sharing its memory; a storage of its own bytes only."""
    n = _numel(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses an empty count
    if offset % dtype.itemsize:  # safetensors aligns its tensors; kernels may assume it, so copy the odd one
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=n * dtype.itemsize, offset=offset)
        return raw.clone().view(dtype).reshape(shape)
    return torch.frombuffer(buffer, dtype=dtype, count=n, offset=offset).reshape(shape)


def _keep(tensor: Tensor) -> None:
    """A release for tensors in memory of their own: the last reference frees them."""


def _releaser(buffer: mmaps.mmap) -> Release:
    base = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()

    def release(tensor: Tensor) -> None:
        # Only whole pages inside the bytes the tensor spans: a page shared with a neighbour stays.
        # A private file page dropped this way is read from the file again if ever touched.
        if tensor.device.type != "cpu" or not hasattr(mmaps, "MADV_DONTNEED") or any(n < 0 for n in tensor.stride()):
            return
        start = tensor.data_ptr() - base
        end = start + (sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride())) + 1) * tensor.element_size()
        if tensor.numel() == 0 or start < 0 or end > len(buffer):
            return  # not of this map (a transform's result)
        lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if hi > lo:
            buffer.madvise(mmaps.MADV_DONTNEED, lo, hi - lo)
    return release


def cast_each(tensors: dict[str, Tensor], dtype: torch.dtype, release: Release | None = None) -> dict[str, Tensor]:
    """`tensors` in `dtype`, converted one at a time (emptying `tensors`): those already in `dtype`
    are kept as they are (no copy). A converted tensor is copied a block of rows at a time, each
    block's source `release`d at once, so the peak is the result plus a block. Call it before
    anything writes to the mapped tensors."""
    out = {}
    for name in list(tensors):
        tensor = tensors.pop(name)
        out[name] = tensor if tensor.dtype == dtype else _cast(tensor, dtype, release)
    return out


_BLOCK = 1 << 24  # bytes of source converted at a time


def _cast(tensor: Tensor, dtype: torch.dtype, release: Release | None) -> Tensor:
    """`tensor.to(dtype)` (the same values and strides), by blocks of its memory's rows."""
    # a transposed matrix (sparsify's encoder) is converted in its file's row order and transposed back
    flip = tensor.dim() == 2 and not tensor.is_contiguous() and tensor.T.is_contiguous()
    source = tensor.T if flip else tensor
    if source.dim() == 0 or not source.is_contiguous():
        out = tensor.to(dtype)
        if release is not None:
            release(tensor)
        return out
    out = torch.empty(source.shape, dtype=dtype)
    step = max(1, _BLOCK // max(1, source[0].numel() * source.element_size()))
    for src, dst in zip(source.split(step), out.split(step)):
        dst.copy_(src)
        if release is not None:
            release(src)
    return out.T if flip else out


# ----------------------------------------------------------------------------------------- .npz
def _bad_npz(file: Path, why: str) -> NoReturn:
    raise FeatoptError(f"{file} is not a readable .npz file ({why}): give Gemma Scope's params.npz.")


def _npy_header(file: Path, member: str, f) -> tuple[tuple[int, ...], bool, object]:
    """`(shape, fortran_order, numpy dtype)` from the start of the .npy stream `f`; after it, `f` is at the data."""
    import numpy as np

    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        _bad_npz(file, f"member {member} has .npy version {version}")
    shape, fortran, dtype = read[version](f)
    return tuple(shape), fortran, dtype


def npz_arrays(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`{name: (shape, dtype)}` of the arrays in an `.npz`, from each member's header (nothing is
    decompressed); FeatoptError for a file that is not one, or that holds arrays torch cannot hold."""
    out = {}
    try:
        with zipfile.ZipFile(file) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    _bad_npz(file, f"member {member} is not an array")
                with zf.open(member) as f:
                    shape, _, dtype = _npy_header(file, member, f)
                out[member.removesuffix(".npy")] = (shape, _torch_dtype(file, member, dtype))
    except FeatoptError:
        raise
    except Exception as e:  # zipfile, numpy and OS errors for a truncated or garbled file
        _bad_npz(file, type(e).__name__)
    return out


def _torch_dtype(file: Path, member: str, dtype) -> torch.dtype:
    import numpy as np

    try:
        found = torch.from_numpy(np.empty(0, dtype.newbyteorder("="))).dtype
    except TypeError:
        found = None
    if found not in _NAMES:
        _bad_npz(file, f"member {member} has dtype {dtype}, not a number type safetensors holds")
    return found


def read_npz(file: Path, *, mmap: bool = True) -> tuple[dict[str, Tensor], Release]:
    """The arrays of an `.npz` as tensors, and a `release` for :func:`cast_each`. `mmap`: through
    the cached conversion (built on first use); else read from the npz, one array at a time.
    A cache that cannot be written (read-only, full) warns and reads the npz instead."""
    file = Path(file)
    if mmap:
        try:
            folder = npz_cache_entry(file)
        except OSError as e:
            warnings.warn(f"featopt: could not write the converted {file} under {cache_dir() / 'sae'} "
                          f"({type(e).__name__}): reading the npz without a cache", stacklevel=2)
        else:
            return read_safetensors(folder / CONVERTED)
    return {name: torch.from_numpy(array) for name, array in _arrays(file, npz_arrays(file))}, _keep


def _arrays(file: Path, arrays: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """`(name, array)` of each member in turn, decompressed one at a time, C order, native byte order."""
    import numpy as np

    with np.load(file, allow_pickle=False) as data:
        for name, (shape, _) in arrays.items():
            try:
                array = data[name]
                array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            except Exception as e:  # a member truncated or garbled past its header
                _bad_npz(file, type(e).__name__)
            if array.shape != shape:
                _bad_npz(file, f"member {name} is not of the shape its header gives")
            yield name, array
            del array  # one array at a time


def npz_cache_entry(file: Path) -> Path:
    """The cache folder holding `file` converted to `params.safetensors`, converted now if missing or
    stale. The key is the absolute path (links kept, as they name the hook), size and mtime; a
    changed npz gets a new entry, and the older ones of the same path are removed."""
    where = os.path.abspath(file)
    stat = os.stat(where)
    path_key = hashlib.sha256(where.encode()).hexdigest()[:16]
    version = json.dumps([_NPZ_FORMAT, stat.st_size, stat.st_mtime_ns])
    name = f"{NPZ_CACHE}-{path_key}-{hashlib.sha256(version.encode()).hexdigest()[:16]}"
    root = cache_dir() / "sae"
    arrays = npz_arrays(file)  # a garbled npz fails here, before anything is written
    folder = entry(root / name, lambda tmp: _convert(file, arrays, tmp / CONVERTED))
    for old in root.glob(f"{NPZ_CACHE}-{path_key}-*"):
        if old.name != name:  # a conversion of an earlier version of this npz
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _convert(file: Path, arrays: dict[str, tuple[tuple[int, ...], torch.dtype]], out: Path) -> None:
    """Write the npz's arrays to the safetensors file `out`. The header comes first, from the
    members' headers; the widest dtypes first keep each tensor aligned. A member already laid out as
    safetensors wants it (C order, little-endian: what np.savez writes) is streamed a block at a
    time; another is read whole and reordered, one array in memory at a time."""
    order = sorted(arrays, key=lambda k: (-arrays[k][1].itemsize, k))
    header, at = {"__metadata__": {"converted_from": os.path.abspath(file)}}, 0
    for name in order:
        shape, dtype = arrays[name]
        size = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads: the data starts 8-aligned
    with open(out, "wb") as f, zipfile.ZipFile(file) as zf:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in order:
            if not _stream(file, zf, name, header[name]["data_offsets"][1] - header[name]["data_offsets"][0], f):
                [(_, array)] = _arrays(file, {name: arrays[name]})
                f.write(array.reshape(-1).view("u1").data)
                del array  # before the next is read


def _stream(file: Path, zf: zipfile.ZipFile, name: str, size: int, f) -> bool:
    """Copy the `size` data bytes of member `name` to `f` a block at a time, if they are already in
    safetensors' layout; False, with nothing written, if not."""
    try:
        member = zf.open(name + ".npy")
        shape, fortran, dtype = _npy_header(file, name, member)
    except FeatoptError:
        raise
    except Exception as e:  # zipfile and numpy errors of a member garbled since its header was read
        _bad_npz(file, type(e).__name__)
    with member:
        if (fortran and len(shape) > 1) or dtype.newbyteorder("<") != dtype:
            return False
        while size:
            try:
                block = member.read(min(size, _BLOCK))
            except Exception as e:  # a truncated or corrupt member (zlib, CRC)
                _bad_npz(file, type(e).__name__)
            if not block:
                _bad_npz(file, f"member {name} ends before its data")
            f.write(block)
            size -= len(block)
    return True
