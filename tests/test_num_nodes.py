"""`featopt sae train --num_nodes 2` launched by hand on this machine (Lightning's environment
variables, two processes standing for two nodes over loopback) trains the SAEs one process does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from featopt.cli import main
from featopt.models.sae.formats import load_sae

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
TRAIN = ["--model", "tiny-llama", "--context_length", "16", "--batch_size", "128", "--tokens", "768",
         "--buffer_batches", "2", "--k", "4", "--eval_contexts", "0", "--optimizer", "adam", "--no_progress",
         "--accelerator", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(argv: list[str], cwd) -> None:
    """Run `featopt *argv --num_nodes 2 --devices 1 --strategy ddp` as node 0 and node 1."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "GROUP_RANK"))}
    procs = []
    for node in (0, 1):
        env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "featopt", *argv, "--num_nodes", "2", "--devices", "1",
                                       "--strategy", "ddp"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{output[-3000:]}"


@pytest.mark.parametrize("extra", [["--site", "blocks.1.resid_post"],
                                   # and rank 0 evaluates the SAEs it gathered, alone, at the end
                                   ["--site", "blocks.0.resid_post,blocks.1.resid_post", "--distribute_modules",
                                    "--eval_contexts", "2"]],
                         ids=["ddp", "distribute_modules"])
def test_two_nodes_train_the_saes_of_one_process(tmp_path, extra):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text(TEXT.upper())
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["sae", "train", *TRAIN, *extra, "--corpus", str(corpus)]
    _two_nodes([*argv, "--out", str(two)], cwd=tmp_path)
    assert main([*argv, "--out", str(one)]) == 0  # the same global batch, in one process
    folders = sorted(p.relative_to(one) for p in [one, *one.iterdir()] if (p / "cfg.json").exists())
    assert len(folders) == len(extra[1].split(","))
    for folder in folders:
        a, b = load_sae(one / folder), load_sae(two / folder)
        for name, value in a.state_dict().items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=1e-5 * scale, msg=f"{folder} {name}")
