"""A real `featopt optimize` process killed by SIGTERM or SIGINT: exit status 128 + N, one line
naming the signal and the checkpoint to resume from, no traceback, no result and no temporary file
left; resuming from that checkpoint ends where an uninterrupted run of the same seed ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featopt.interrupt import Interrupted, raising_on_signals
from featopt.commands.optimize import AscentConfig
from featopt.commands.optimize import optimize as run
from featopt.results import read_results

FLAGS = {"model": "tiny-gpt2", "features": "[:, :, 0-1]", "tokens": 3, "seed": 3, "lr": 0.05}


def _start(out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "featopt", "optimize", "--model", "tiny-gpt2", "--features", FLAGS["features"],
            "--tokens", "3", "--seed", "3", "--lr", "0.05", "--steps", "100000", "--checkpoint_every", "4",
            "--decode_every", "100000", "--no_progress", "--out", str(out)]
    # A background shell job starts with SIGINT ignored, which featopt respects: give the child the default.
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"featopt ended before writing {path}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_run_exits_cleanly_and_resumes_to_the_same_result(signum, tmp_path):
    out = tmp_path / "killed"
    proc = _start(out)
    last = out / "checkpoints" / "last.ckpt"
    _wait_for(last, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"featopt: interrupted by {signal.Signals(signum).name}; resume it with the same flags plus --resume {last}.")
    assert "Traceback" not in stderr
    assert not (out / "results.json").exists()
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["featopt"] == {"command": "optimize"}
    steps = checkpoint["global_step"] + 6  # past wherever the kill landed, whatever the machine's speed
    quiet = {"progress": False, "decode_every": 1000, "steps": steps, "checkpoint_every": 4}
    resumed = run(AscentConfig(**FLAGS, **quiet, resume=str(last), out=str(tmp_path / "resumed")))
    plain = run(AscentConfig(**FLAGS, **quiet, out=str(tmp_path / "plain")))

    assert resumed.trainer.global_step == plain.trainer.global_step == steps
    for a, b in zip(resumed.results, plain.results, strict=True):
        assert a.token_ids == b.token_ids
        assert a.activation == pytest.approx(b.activation, rel=1e-5, abs=1e-6)
        assert a.continuous_activation == pytest.approx(b.continuous_activation, rel=1e-5, abs=1e-6)
    saved = [load_file(tmp_path / name / "embeddings.safetensors") for name in ("resumed", "plain")]
    torch.testing.assert_close(saved[0]["embeddings"], saved[1]["embeddings"], rtol=1e-5, atol=1e-6)
    assert read_results(tmp_path / "resumed")[1][0].token_ids == plain.results[0].token_ids


def test_signal_becomes_interrupted_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, raising_on_signals():
        signal.raise_signal(signal.SIGTERM)
    assert (caught.value.name, caught.value.exit_status) == ("SIGTERM", 143)
    assert signal.getsignal(signal.SIGTERM) is before
    # A test run started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, which
    # raising_on_signals rightly leaves alone: give this check Python's own SIGINT handler.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with raising_on_signals():  # a second signal while cleaning up is ignored
            with pytest.raises(Interrupted):
                signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
