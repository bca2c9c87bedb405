"""Run the suite's command lines in order, in this process, through `featopt.cli.main(argv)`.

Shared by the test and the recorder so that both run exactly the same thing. Everything a run
writes stays under one root folder: the corpus, every command's `--out`, the working directory
and `FEATOPT_CACHE` (the pseudoinverse and compiled-kernel caches), so nothing depends on what an
earlier session left in ~/.cache.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .commands import COMMANDS, Command
from .corpus import write_corpus


@dataclass
class Ran:
    command: Command
    argv: list[str]  # as run, placeholders filled in
    status: int
    stdout: str
    stderr: str
    out: Path
    seconds: float


def argv_of(command: Command, root: Path) -> list[str]:
    fill = {"corpus": str(root / "corpus"), "runs": str(root / "runs")}
    return [a.format(**fill) for a in command.argv] + ["--out", str(root / "runs" / command.name)]


@contextlib.contextmanager
def _environment(root: Path):
    """FEATOPT_CACHE under `root`, offline, cwd `root/cwd`, one torch thread; all restored after."""
    import torch

    # CUDA_VISIBLE_DEVICES: the fixtures are CPU numbers, and `--device auto` would pick a GPU (it
    # takes effect only where CUDA was not initialized yet in this process, as in a fresh pytest).
    env = dict(FEATOPT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    saved_env = {k: os.environ.get(k) for k in env}
    saved_cwd, saved_threads = os.getcwd(), torch.get_num_threads()
    (root / "cwd").mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    os.chdir(root / "cwd")
    # One thread: reductions then run in one order whatever the machine's core count.
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reset_random_state() -> None:
    """Every command takes an explicit --seed and featopt seeds its own generators, so this changes
    nothing today (checked: each command in a fresh process gives the same records). It keeps a
    command that would draw from a global generator unseeded from depending on what ran before it
    in this process (earlier commands, or other tests in the same pytest session)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _main(argv: list[str]) -> tuple[int, str, str]:
    from featopt.cli import main

    _reset_random_state()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as stop:  # the parser exits 2 on malformed flags
            status = stop.code if isinstance(stop.code, int) else 1
    return status or 0, out.getvalue(), err.getvalue()


def run_suite(root: Path, commands: list[Command] = COMMANDS, log=None) -> dict[str, Ran]:
    """Every command in order under `root` (created); name -> what it did. Stops at the first
    command that fails, since later ones read its output."""
    root = Path(root)
    write_corpus(root / "corpus")
    done: dict[str, Ran] = {}
    with _environment(root):
        for command in commands:
            argv = argv_of(command, root)
            start = time.perf_counter()
            status, stdout, stderr = _main(argv)
            ran = Ran(command, argv, status, stdout, stderr, root / "runs" / command.name, time.perf_counter() - start)
            done[command.name] = ran
            if log:
                log(f"{command.name:24s} exit {status}  {ran.seconds:6.1f} s")
            if status != 0:
                raise RuntimeError(f"`featopt {' '.join(argv)}` exited {status}:\n{stderr[-3000:]}")
    return done
