"""The fused CPU tile reduction of :mod:`featopt.weights.decode` (`tile_reduce.c`), built on first use.

A plain C file compiled with the system's C compiler (`$CC`, else `cc`) into featopt's cache and
loaded with ctypes: no torch headers, so it builds in about a second. With OpenMP it splits rows
over torch's own worker threads (see the .c file); a compiler without OpenMP gets a build whose
rows Python threads split (ctypes releases the GIL), which is slower on a CPU that torch keeps busy.
Where there is no compiler or the build fails, :func:`kernel` returns None and decoding takes the
pure-torch path, which gives the same results more slowly (see benchmarks/README.md).
`FEATOPT_NATIVE=0` turns it off. Failed builds are remembered in the cache too (`*.failed`):
delete `~/.cache/featopt/native` to retry after installing a compiler or OpenMP.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from featopt import cache
from featopt.cache import cache_dir
from featopt.results import atomic_write

SOURCE = Path(__file__).with_name("tile_reduce.c")
LIBRARY = "tile_reduce.so"
_lock = threading.Lock()
_state: dict = {}


def _cpu_fingerprint() -> str:
    """`-march=native` code must not run on another CPU from a shared cache: key it on the flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


# Tried in order: Apple's clang has no -fopenmp, and on arm64 some compilers no -march=native.
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())


def build(flags: tuple[str, ...]) -> Path | None:
    """`tile_reduce.c` compiled with `-O3 *flags` into featopt's cache (reused while the source, the
    compiler, the flags and the CPU stay the same), or None where the compiler refuses. A refusal is
    cached too: where the first flag sets fail (no OpenMP on macOS), retrying them would cost every
    process a failed compile."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    tag = " ".join([compiler, *flags, _cpu_fingerprint()]).encode()
    folder = cache_dir() / "native" / f"tile_reduce-{hashlib.sha256(SOURCE.read_bytes() + tag).hexdigest()[:16]}"
    failed = folder.with_name(folder.name + ".failed")
    if failed.exists() and not cache.is_valid(folder):
        _state["error"] = failed.read_text()
        return None

    def compile_into(tmp: Path) -> None:
        result = subprocess.run([compiler, "-O3", *flags, "-fPIC", "-shared", str(SOURCE), "-o", str(tmp / LIBRARY),
                                 "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise _Refused(result.stderr.strip()[:300])

    try:  # an entry folder (see featopt.cache.entry): atomic, checked on read, rebuilt when corrupt
        cache.entry(folder, compile_into)
    except _Refused as refusal:
        _state["error"] = str(refusal)
        atomic_write(failed, lambda tmp: Path(tmp).write_text(_state["error"]))
        return None
    return folder / LIBRARY


class _Refused(Exception):
    """The compiler refused these flags (its message)."""


def load(path: Path):
    """`featopt_tile_reduce` of a built library, typed for ctypes; `.openmp` says who splits rows."""
    lib = ctypes.CDLL(str(path))
    fn = lib.featopt_tile_reduce
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int]
    fn.restype = None
    fn.openmp = bool(lib.featopt_tile_reduce_openmp())
    return fn


def kernel():
    """The compiled `featopt_tile_reduce`, or None (no compiler, failed build, `FEATOPT_NATIVE=0`)."""
    if os.environ.get("FEATOPT_NATIVE", "1") == "0":
        return None
    with _lock:
        if "fn" not in _state:
            path = next((p for p in map(build, FLAG_SETS) if p is not None), None)
            if path is None and "error" in _state:
                warnings.warn(f"featopt: building {SOURCE.name} failed, decoding uses the slower torch path: "
                              f"{_state.get('error', '')}", stacklevel=2)
            _state["fn"] = None if path is None else load(path)
    return _state["fn"]


def _pool(threads: int) -> ThreadPoolExecutor:
    if _state.get("threads") != threads:
        if "pool" in _state:
            _state["pool"].shutdown()
        _state["pool"], _state["threads"] = ThreadPoolExecutor(threads, thread_name_prefix="featopt-tile"), threads
    return _state["pool"]


class TileReducer:
    """Running top-`K` and base-2 log-sum-exp of `R` rows fed tile by tile (float32 CPU logits).

    `update(logits [R, vc], offset)`; then `top()` -> values `[R, K']`, token ids `[R, K']` (unsorted;
    K' = min(K, tokens seen)) and `logsumexp2()` -> `[R]` float64, log2 of sum of 2^logit.
    """

    def __init__(self, fn, R: int, K: int, lse: bool = True):
        self.fn, self.R, self.K, self.lse = fn, R, K, lse
        self.values = torch.empty(R, K, dtype=torch.float32)
        self.ids = torch.empty(R, K, dtype=torch.int64)
        self.size = torch.zeros(R, dtype=torch.int32)
        self.max = torch.full((R,), float("-inf"), dtype=torch.float64)
        self.sum = torch.zeros(R, dtype=torch.float64)
        self.threads = max(1, min(torch.get_num_threads(), R))
        self.pool = _pool(self.threads) if self.threads > 1 and not fn.openmp else None
        self.splits = [(R * t // self.threads, R * (t + 1) // self.threads) for t in range(self.threads)]

    def update(self, logits: Tensor, offset: int) -> None:
        if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1 or len(logits) != self.R:
            raise ValueError("TileReducer takes float32 CPU logits [R, vc] with contiguous rows")
        args = (logits.data_ptr(), logits.shape[1], logits.stride(0), offset, self.values.data_ptr(), self.ids.data_ptr(),
                self.size.data_ptr(), self.K, self.max.data_ptr(), self.sum.data_ptr())
        if self.pool is None:
            self.fn(*args, 0, self.R, int(self.lse), self.threads)
        else:
            for job in [self.pool.submit(self.fn, *args, r0, r1, int(self.lse), 1) for r0, r1 in self.splits]:
                job.result()

    def top(self) -> tuple[Tensor, Tensor]:
        n = int(self.size.min())
        return self.values[:, :n], self.ids[:, :n]

    def logsumexp2(self) -> Tensor:
        return self.max + self.sum.log2()
