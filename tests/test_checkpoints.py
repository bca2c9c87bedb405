"""`--resume` given something that is not a checkpoint of this command and problem: one sentence
naming --resume, exit status 2, no traceback and no result."""

from __future__ import annotations

import pytest
import torch

from featopt.cli import main
from featopt.commands.optimize import AscentConfig
from featopt.commands.optimize import optimize as run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run(AscentConfig(model="tiny-gpt2", features="[:, :, 0-1]", tokens=3, steps=2, checkpoint_every=1,
                     progress=False, out=str(out)))
    return out / "checkpoints" / "last.ckpt"


def _resume(path, tmp_path, capsys, *flags) -> str:
    out = tmp_path / "out"
    code = main(["optimize", "--model", "tiny-gpt2", "--features", "[:, :, 0-1]", "--tokens", "3", "--steps", "3",
                 "--no_progress", "--out", str(out), "--resume", str(path), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (out / "results.json").exists()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featopt: error: --resume {str(path)!r} "), err
    return lines[0]


def test_a_text_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n")
    assert "is not a featopt checkpoint" in _resume(path, tmp_path, capsys)


def test_a_truncated_checkpoint(checkpoint, tmp_path, capsys):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert "is not a featopt checkpoint" in _resume(path, tmp_path, capsys)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "optimizer_states": [], "loops": {}, "x": object()}, path)
    assert "is not a featopt checkpoint (torch.load: " in _resume(path, tmp_path, capsys)


def test_a_checkpoint_of_another_command(checkpoint, tmp_path, capsys):
    data = torch.load(checkpoint, weights_only=True)
    data["featopt"] = {"command": "invert"}
    torch.save(data, tmp_path / "invert.ckpt")
    assert "is a checkpoint of `featopt invert`, not of `featopt optimize`" in _resume(tmp_path / "invert.ckpt", tmp_path, capsys)


def test_a_checkpoint_of_another_shape(checkpoint, tmp_path, capsys):
    line = _resume(checkpoint, tmp_path, capsys, "--tokens", "4")
    assert "was written for another problem (parametrization.embeds [2, 3, 64] there, parametrization.embeds [2, 4, 64] here)" in line


def test_a_lightning_checkpoint_without_featopt_state(tmp_path, capsys):
    torch.save({"state_dict": {}, "epoch": 0}, tmp_path / "other.ckpt")
    assert "lacks Lightning's state" in _resume(tmp_path / "other.ckpt", tmp_path, capsys)


def test_the_right_checkpoint_resumes(checkpoint, tmp_path, capsys):
    code = main(["optimize", "--model", "tiny-gpt2", "--features", "[:, :, 0-1]", "--tokens", "3", "--steps", "3",
                 "--no_progress", "--out", str(tmp_path / "out"), "--resume", str(checkpoint)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").is_file()


def test_invert_refuses_a_checkpoint_of_optimize(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["invert", "--model", "tiny-gpt2", "--text", "hello world", "--steps", "2", "--no_progress",
                 "--out", str(out), "--resume", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (out / "results.json").exists()
    assert err.strip() == (f"featopt: error: --resume {str(checkpoint)!r} is a checkpoint of `featopt optimize`, not of "
                           "`featopt invert`: give the last.ckpt (or step<N>.ckpt) that `featopt invert --checkpoint_every N` "
                           "wrote under OUT/checkpoints, with the same problem flags.")
