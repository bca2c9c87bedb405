"""Running a discrete search in several processes (`--devices K`): one process group, each rank
scoring its shard of the candidates; rank 0 writes the results, which the caller reads back."""

from __future__ import annotations

import socket

import torch.distributed as dist


def distributed() -> tuple[int, int]:
    """`(rank, world_size)` of the initialized process group, else `(0, 1)`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, run_fn, config, adapter, port: int) -> None:
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.devices)
    try:
        run_fn(config, adapter)
    finally:
        dist.destroy_process_group()


def spawn(run_fn, config, adapter) -> None:
    """Run `run_fn(config, adapter)` in `config.devices` processes (one process group on this
    machine: gloo, or nccl when `config.device` is cuda); returns when every rank has finished.
    The config must name its folder and device already: every rank reads the same ones."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(run_fn, config, adapter, free_port()), nprocs=config.devices, join=True)
