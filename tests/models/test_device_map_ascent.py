"""`featopt optimize` under `--device_map`: gradient ascent on the input embeddings of a dispatched
model (layers offloaded to the disk, or spilled there by a small `max_memory`) finds the same input
as on the plainly loaded model. The ascent amplifies any difference in a forward or backward (its
L1 target drives the activation far from where it starts), so this is the strictest check that the
dispatch changes no number: the same decoded tokens, the same activations up to float rounding."""

from __future__ import annotations

import pytest
import torch

from featopt.commands.optimize import AscentConfig, optimize

DISK_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, name: str, **placement):
    config = AscentConfig(model="tiny-llama", layer=1, features="[:, :, 0-1]", steps=20, progress=False,
                          accelerator="cpu", out=str(tmp_path / name), **placement)
    run = optimize(config)
    return run, run.module.parametrization(None).detach().clone()


@pytest.mark.parametrize("placement", [
    dict(device_map="auto", max_memory='{"cpu": 150000}'),  # the whole model spilled to the disk
    dict(device_map=DISK_MAP),  # embedding and LM head on the disk, layers split over the CPU and the disk
], ids=["max_memory", "disk"])
def test_optimize_finds_the_same_input_when_dispatched(tmp_path, placement):
    plain, plain_embeds = _run(tmp_path, "plain")
    run, embeds = _run(tmp_path, "dispatched", **placement)
    assert run.module.adapter.dispatched and not plain.module.adapter.dispatched
    assert "disk" in run.module.adapter.info.device_map.values()
    # The optimized input itself, then its answers: decoded tokens and their re-measured activations.
    torch.testing.assert_close(embeds, plain_embeds, rtol=1e-4, atol=1e-5)
    assert [r.token_ids for r in run.results] == [r.token_ids for r in plain.results]
    for got, want in zip(run.results, plain.results):
        assert got.activation == pytest.approx(want.activation, rel=1e-4, abs=1e-6)
        assert got.continuous_activation == pytest.approx(want.continuous_activation, rel=1e-4, abs=1e-6)
        assert got.extra["score"] == pytest.approx(want.extra["score"], rel=1e-4, abs=1e-6)
