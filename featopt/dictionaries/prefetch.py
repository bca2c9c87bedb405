"""The model's forward for the next buffer overlapping the SAE steps on this one (`sae train
--sae_device`): the model on one device, the SAEs on another, the two no longer taking turns.

SAE training alternates between filling a buffer of activations (the model's forward over its
contexts, most of the time) and many SAE steps drawing batches from it. :class:`Prefetching` wraps
an activation source: when the stream has filled buffer g it names buffer g+1's contexts
(:meth:`Prefetching.prefetch`), and a background thread runs the model on them while the main
thread trains; the stream's next fill then takes the result. PyTorch releases the GIL inside its
operations, so on two devices the forward and the SAE step run at once (SAELens #674 measured
about 2x on two H100s); on one device they share it. The batches are exactly the ones without
prefetching: only when they are computed changes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import Tensor


class Prefetching:
    """`source(index) -> {site: [C, T, d]}`, with the next call computed ahead in one thread.

    Anything else that runs the model (a held-out evaluation) calls :meth:`wait` first: a forward
    in flight holds the model's hooks. Two buffers are held at once, which `token_bytes` counts.
    """

    def __init__(self, source):
        self.source = source
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Tensor, Future] | None = None

    def __getattr__(self, name):  # n_contexts, contexts, sites, ...: the source's
        if name.startswith("_") or name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def token_bytes(self) -> int:
        return 2 * self.source.token_bytes

    def prefetch(self, index: Tensor) -> None:
        """Start computing `source(index)` in the background (after any computation in flight)."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="featopt-prefetch")
        self._pending = (index.clone(), self._pool.submit(self.source, index))

    def __call__(self, index: Tensor) -> dict:
        pending, self._pending = self._pending, None
        if pending is not None:
            ahead, future = pending
            result = future.result()  # raises here what the thread raised
            if torch.equal(ahead, index):
                return result
        return self.source(index)

    def wait(self) -> None:
        """Block until the computation in flight (if any) is done; its result is kept."""
        if self._pending is not None:
            wait([self._pending[1]])

    def close(self) -> None:
        """Finish the computation in flight and end the thread (the result is dropped)."""
        self.wait()
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def split_devices(sae_device: str, accelerator: str, devices: int) -> tuple[str, int | list[int], str]:
    """`(accelerator, devices, model device)` of a run whose SAEs train on `sae_device` ("cpu",
    "cuda", "cuda:N", "mps"): Lightning's accelerator and device list for the SAEs, and the model's
    device: the first other CUDA device where there is one (cuda:0 for SAEs on cuda:1), else the
    same device as the SAEs. Raises FeatoptError for a device that is not there."""
    from featopt.errors import FeatoptError

    kind, _, number = sae_device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (number and not number.isdigit()) or (kind != "cuda" and number):
        raise FeatoptError(f"--sae_device {sae_device!r} is not a device: give cpu, cuda, cuda:N or mps.")
    if devices != 1 or accelerator not in ("auto", "cpu" if kind == "cpu" else "gpu", kind):
        raise FeatoptError(f"--sae_device {sae_device} places the SAEs itself: leave --devices at 1 and --accelerator "
                           "at auto.")
    if kind == "cpu":
        return "cpu", 1, "cuda:0" if torch.cuda.is_available() else "cpu"
    if kind == "mps":
        return "mps", 1, "cpu"
    count = torch.cuda.device_count()
    index = int(number or 0)
    if index >= count:
        raise FeatoptError(f"--sae_device {sae_device} names a GPU this machine does not have ({count} found).")
    others = [i for i in range(count) if i != index]
    return "gpu", [index], f"cuda:{others[0]}" if others else f"cuda:{index}"
