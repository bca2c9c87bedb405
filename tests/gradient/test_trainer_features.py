"""Lightning's features on a featopt run: mixed precision, checkpoint and resume, TensorBoard,
and several processes giving the numbers of one."""

from __future__ import annotations

import pytest
import torch

from featopt.models import ModelAdapter, Site
from featopt.models.tiny import build_tiny
from featopt.commands.optimize import AscentConfig
from featopt.commands.optimize import optimize as run


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-gpt2")
    return ModelAdapter(model, tok, name="tiny-gpt2")


def _config(tmp_path, **kw):
    base = dict(model="tiny-gpt2", layer=1, features="[:, :, 0-2]", tokens=3, steps=20, lr=0.05,
                out=str(tmp_path), progress=False, decode_every=5, log_every=5)
    return AscentConfig(**{**base, **kw})


def test_bf16_mixed_runs_the_model_in_bfloat16_and_still_ascends(tiny, tmp_path):
    seen = []

    def spy(act, site):
        seen.append(act.dtype)
        return act

    fp32 = run(_config(tmp_path / "fp32", steps=1), tiny)
    # A write hook that returns its input records the dtype the model computes in.
    original = tiny.run
    tiny.run = lambda sites, **kw: original(sites, **{**kw, "write": {Site(1, "attn_out"): spy}})
    try:
        bf16 = run(_config(tmp_path / "bf16", precision="bf16-mixed", steps=40), tiny)
    finally:
        tiny.run = original
    assert torch.bfloat16 in seen  # during training steps
    assert seen[-1] == torch.float32  # the final re-measurement is full precision
    for before, after in zip(fp32.results, bf16.results):
        assert after.continuous_activation > before.continuous_activation


def test_64_true_ascends_like_32_true(tiny, tmp_path):
    """64-true makes float64 the default dtype inside the run: the logged activations still fit."""
    fp32 = run(_config(tmp_path / "fp32", steps=10), tiny)
    fp64 = run(_config(tmp_path / "fp64", precision="64-true", steps=10), tiny)
    for a, b in zip(fp32.results, fp64.results):
        assert b.continuous_activation == pytest.approx(a.continuous_activation, rel=1e-3, abs=1e-4)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(tiny, tmp_path):
    whole = run(_config(tmp_path / "whole", steps=20, checkpoint_every=10), tiny)
    ckpt = tmp_path / "whole" / "checkpoints" / "step10.ckpt"
    assert ckpt.exists()
    resumed = run(_config(tmp_path / "resumed", steps=20, resume=str(ckpt)), tiny)
    torch.testing.assert_close(resumed.module.parametrization.embeds, whole.module.parametrization.embeds, rtol=0, atol=0)
    assert [r.token_ids for r in resumed.results] == [r.token_ids for r in whole.results]
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert list(state) == ["parametrization.embeds"]  # the language model is never checkpointed


def test_tensorboard_gets_scalars_and_decoded_text(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(_config(tmp_path, steps=20), tiny)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert "loss" in scalars and "activation/mean" in scalars
    for p, problem in enumerate(result.module.selection.problems):
        tag = f"activation/{p}_{problem.spec}"
        assert tag in scalars
    texts = events.Tags()["tensors"]  # add_text is stored as a string tensor
    assert any(t.startswith("decoded/0_") for t in texts)
    # the last logged loss is the L1 loss of the final-but-one step: positive and finite
    losses = [e.value for e in events.Scalars("loss")]
    assert len(losses) >= 4 and all(v > 0 for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("strategy", ["ddp_spawn"])
def test_two_processes_give_the_results_of_one(tiny, tmp_path, strategy):
    # 3 problems over 2 ranks: an uneven split (2 + 1) is the harder case.
    one = run(_config(tmp_path / "one", steps=15), tiny)
    two = run(_config(tmp_path / "two", steps=15, devices=2, strategy=strategy, accelerator="cpu"), tiny)
    assert two.trainer.world_size == 2
    assert [r.token_ids for r in two.results] == [r.token_ids for r in one.results]
    torch.testing.assert_close(two.module.parametrization.embeds, one.module.parametrization.embeds, rtol=1e-5, atol=1e-5)
    for a, b in zip(one.results, two.results):
        assert a.activation == pytest.approx(b.activation, abs=1e-5)
