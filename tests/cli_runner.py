"""Run `featopt` command lines, each in its own process, without paying ~4 s of imports per line.

A server subprocess imports `featopt.cli` with torch, transformers and Lightning once, then for
each command line `os.fork()`s a child that sends fds 1/2 to files, runs `featopt.cli.main(argv)`
and `os._exit`s with its status. A child is a fresh process as far as the command can tell (its
own exit, its own writes, its own crash), and costs only the fork and the command itself.

Fork is safe only while the server has run no torch op and started no thread (a thread pool does
not survive a fork): the server checks that it runs no other Python thread before every fork, and each
child sets `torch.set_num_threads(1)` (several children may run side by side on 2 shared cores).

    with CliServer() as cli:
        result = cli.run(["search", "greedy", "--model", "tiny-gpt2"], cwd=tmp_path)
        result.status, result.stdout, result.stderr
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CliResult:
    status: int  # exit status; -N when killed by signal N
    stdout: str
    stderr: str


class CliServer:
    """A server subprocess that forks one child per command line (see the module docstring)."""

    def __init__(self, env: dict | None = None):
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self._proc = subprocess.Popen([sys.executable, "-u", __file__, "--serve"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=self._env)
        ready = self._proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the featopt CLI server did not start: {ready!r}")

    def run(self, argv: list[str], cwd: str | Path | None = None, timeout: float = 300) -> CliResult:
        """`featopt *argv` in a forked child, in `cwd`; its status, stdout and stderr."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd()), "stdout": str(out),
                       "stderr": str(err), "timeout": timeout}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline()
            if not reply:
                raise RuntimeError("the featopt CLI server died")
            reply = json.loads(reply)
            if "error" in reply:
                raise RuntimeError(reply["error"])
            read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
            return CliResult(reply["status"], read(out), read(err))

    def run_many(self, cases: list[tuple[list[str], str | Path]], jobs: int = 2, timeout: float = 300) -> list[CliResult]:
        """Each `(argv, cwd)` in its own forked child, `jobs` at a time; results in order. A case's
        stdout and stderr are kept in `cwd/.stdout` and `cwd/.stderr`."""
        requests = [{"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(Path(cwd) / ".stdout"),
                     "stderr": str(Path(cwd) / ".stderr"), "timeout": timeout} for argv, cwd in cases]
        self._proc.stdin.write(json.dumps({"batch": requests, "jobs": jobs}) + "\n")
        self._proc.stdin.flush()
        reply = json.loads(self._proc.stdout.readline() or '{"error": "the featopt CLI server died"}')
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return [CliResult(status, Path(r["stdout"]).read_text(errors="replace"), Path(r["stderr"]).read_text(errors="replace"))
                for status, r in zip(reply["statuses"], requests)]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_process(argv: list[str], cwd: str | Path | None = None, env: dict | None = None, timeout: float = 300) -> CliResult:
    """The plain way, for comparison: `python -m featopt *argv` in a new interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "featopt", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------- the server side
def _threads() -> int:
    # Python threads: importing torch itself leaves one idle native thread, as in any torch process.
    import threading

    return threading.active_count()


def _child(request: dict) -> None:
    """In the forked child: redirect, run, exit. Never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.close(0)  # a command must not read the server's requests
        import torch

        torch.set_num_threads(1)
        from featopt.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as stop:  # the parser's exit, as `sys.exit` would end a real process
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        code = 0 if code is None else code
    except BaseException:  # what a real process would print before exiting 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _run_all(requests: list[dict], jobs: int) -> list[int]:
    """Fork a child per request, at most `jobs` alive at once; their exit statuses, in order."""
    import signal
    import time

    statuses, running, queue = [None] * len(requests), {}, list(enumerate(requests))
    while queue or running:
        while queue and len(running) < jobs:
            if _threads() != 1:  # forking a threaded process can deadlock the child
                raise RuntimeError(f"the server has {_threads()} Python threads: it cannot fork safely")
            i, request = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running[pid] = (i, time.monotonic() + request["timeout"])
        for pid, (i, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            if done:
                statuses[i] = os.waitstatus_to_exitcode(status)
                del running[pid]
        time.sleep(0.005)
    return statuses


def serve() -> None:
    # Import everything a command may need once; the children inherit it. No torch op runs here.
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401

    import featopt.cli
    from featopt.commands.registry import COMMANDS

    featopt.cli._quiet_lightning()
    # Build the parser (and import every config's module) once: each child parses with its copy.
    parser = featopt.cli.build_parser()
    featopt.cli.build_parser = lambda: parser
    import importlib

    for module in dict.fromkeys(c.module for c in COMMANDS):
        importlib.import_module(module)
    import featopt.commands.demo  # noqa: F401
    import featopt.models.tiny  # noqa: F401
    import featopt.gradient.inversion  # noqa: F401

    channel = sys.stdout
    print("ready", file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "batch" in request:
                reply = {"statuses": _run_all(request["batch"], request["jobs"])}
            else:
                reply = {"status": _run_all([request], 1)[0]}
        except RuntimeError as error:
            reply = {"error": str(error)}
        print(json.dumps(reply), file=channel, flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
