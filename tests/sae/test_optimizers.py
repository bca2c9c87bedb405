"""The SAE trainer's signum (sparsify's schedule-free sign SGD): its steps are the schedule-free
recurrence written out by hand; through `featopt sae train` it learns, saves the averaged point
x (not the training point y), and neither checkpoints nor held-out evaluations move its weights,
so a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import math

import pytest
import torch

from featopt.commands.sae_train import TrainConfig, train
from featopt.dictionaries.optimizers import build, default_lr, evaluation_point
from featopt.errors import FeatoptError
from featopt.models.sae.formats import load_sae

BETA = 0.95  # sparsify's momentum for signum


def test_default_learning_rates_are_sparsifys():
    assert default_lr("adam", 2**14) == pytest.approx(2e-4)
    assert default_lr("signum", 2**14) == pytest.approx(2e-3)
    assert default_lr("signum", 2**16) == pytest.approx(1e-3)  # 1 / sqrt(4)
    assert default_lr("adam", 256) == pytest.approx(2e-4 * 8)
    assert "lr_scheduler" in build("adam", [{"params": [torch.zeros(2, requires_grad=True)], "lr": 1.0}],
                                   total_steps=10, warmup_steps=2, decay_fraction=0.2)
    assert set(build("signum", [{"params": [torch.zeros(2, requires_grad=True)], "lr": 1.0}],
                     total_steps=10, warmup_steps=2, decay_fraction=0.2)) == {"optimizer"}


def test_signum_steps_are_the_schedule_free_sign_sgd_recurrence():
    """Two parameter groups on `sum w (p - t)^2`, curvatures w over six decades (so only the sign
    of the gradient can agree with the hand loop), one group's lr raised mid-run (so the average's
    weights lr_max^2 / sum lr_max^2 are not just 1 / (k + 1)); float64 throughout."""
    gen = torch.Generator().manual_seed(0)
    starts = [torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    targets = [s + 0.3 * torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in starts]
    curvatures = [10 ** (6 * torch.rand(s.shape, generator=gen, dtype=torch.float64) - 3) for s in starts]
    schedules = [[0.1] * 8, [0.05] * 3 + [0.2] * 5]  # lr of each group at each step

    params = [s.clone().requires_grad_(True) for s in starts]
    optimizer = build("signum", [{"params": [p], "lr": lrs[0]} for p, lrs in zip(params, schedules)],
                      total_steps=8, warmup_steps=0, decay_fraction=0.0)["optimizer"]
    # The recurrence by hand (Defazio et al. 2024, "The Road Less Scheduled", with the package's
    # weighting c_k = lr_max^2 / sum_{i<=k} lr_max^2, polynomial power r = 0):
    #   y = (1 - beta) z + beta x;  z <- z - lr sign(grad f(y));  x <- (1 - c) x + c z
    xs, zs = [s.clone() for s in starts], [s.clone() for s in starts]
    lr_max, weight_sum = [0.0, 0.0], [0.0, 0.0]
    for step in range(8):
        for g, group in enumerate(optimizer.param_groups):
            group["lr"] = schedules[g][step]
        optimizer.zero_grad()
        sum(((p - t).pow(2) * w).sum() for p, t, w in zip(params, targets, curvatures)).backward()
        optimizer.step()
        for g in range(2):
            y = (1 - BETA) * zs[g] + BETA * xs[g]
            grad = 2 * curvatures[g] * (y - targets[g])
            zs[g] = zs[g] - schedules[g][step] * grad.sign()
            lr_max[g] = max(lr_max[g], schedules[g][step])
            weight_sum[g] += lr_max[g] ** 2
            c = lr_max[g] ** 2 / weight_sum[g]
            xs[g] = (1 - c) * xs[g] + c * zs[g]
            y_next = (1 - BETA) * zs[g] + BETA * xs[g]
            torch.testing.assert_close(params[g].detach(), y_next, msg=f"y, group {g}, step {step}")
            torch.testing.assert_close(evaluation_point(optimizer, params[g]), xs[g], msg=f"x, group {g}, step {step}")
    assert float((xs[1] - params[1].detach()).abs().max()) > 1e-3  # x and y are far apart: the checks above can tell
    optimizer.eval()
    for g in range(2):
        torch.testing.assert_close(params[g].detach(), xs[g])
        torch.testing.assert_close(evaluation_point(optimizer, params[g]), xs[g])  # eval mode: p is x
    optimizer.train()
    for g in range(2):
        torch.testing.assert_close(params[g].detach(), (1 - BETA) * zs[g] + BETA * xs[g])


# ----------------------------------------------------------------------------- through the command
TEXT = "The cat sat on the mat. The dog ran to the park and back again. " * 30
STEPS = 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Signum runs of a topk SAE (d_sae 256) on tiny-llama, 40 steps of 128 tokens: `start` (one
    step), `whole`, `saving` (checkpoints every 10 steps, held-out evaluations every 20) and
    `resumed` (from `saving`'s step-20 checkpoint)."""
    tmp = tmp_path_factory.mktemp("signum")
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text(TEXT.upper())
    base = dict(model="tiny-llama", site="blocks.1.resid_post", corpus=str(corpus), context_length=16, batch_size=128,
                buffer_batches=2, k=4, eval_contexts=4, progress=False, optimizer="signum", tokens=128 * STEPS)
    out = {"tmp": tmp, "base": base}
    out["start"] = train(TrainConfig(**{**base, "tokens": 128}, out=str(tmp / "start")))
    out["whole"] = train(TrainConfig(**base, out=str(tmp / "whole")))
    out["saving"] = train(TrainConfig(**base, checkpoint_every=10, eval_every=20, out=str(tmp / "saving")))
    out["ckpt"] = tmp / "saving" / "checkpoints"
    out["resumed"] = train(TrainConfig(**base, resume=str(out["ckpt"] / "step20.ckpt"), out=str(tmp / "resumed")))
    return out


def test_signum_training_lowers_fvu_and_saves_the_averaged_point_x(runs):
    start, whole = runs["start"].metrics[0]["fvu"], runs["whole"].metrics[0]["fvu"]  # held-out FVU
    assert start > 0.6 and whole < 0.4 * start, (start, whole)
    saved = load_sae(runs["tmp"] / "saving")
    assert saved.cfg.metadata["train_config"]["optimizer"] == "signum"
    # The checkpoint of the last step holds y (weights) and z (optimizer state); x by hand from
    # y = (1 - beta) z + beta x, then the input scale folded in as `sae train` documents.
    checkpoint = torch.load(runs["ckpt"] / f"step{STEPS}.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    opt_state = checkpoint["optimizer_states"][0]
    assert opt_state["param_groups"][0]["lr"] == pytest.approx(2e-3 / math.sqrt(256 / 2**14))  # signum's default
    scale = float(checkpoint["state_dict"]["scales"][0])
    fold = {"W_enc": scale, "b_enc": 1.0, "W_dec": 1 / scale, "b_dec": 1 / scale}
    for index, (name, value) in enumerate(saved.named_parameters()):
        y = checkpoint["state_dict"][f"saes.0.{name}"].double()
        z = opt_state["state"][index]["z"].double()
        x = (y - (1 - BETA) * z) / BETA
        torch.testing.assert_close(value.detach().double(), x * fold[name], rtol=1e-5, atol=1e-6, msg=name)
        if name.startswith("W"):  # and not y: the two points differ by far more than the tolerance
            assert float((x - y).abs().max()) > 1e-2, name
    # after training, the module's own weights are x too (training scale)
    module = runs["saving"].module
    torch.testing.assert_close(module.saes[0].W_dec.detach() / scale, saved.W_dec, rtol=1e-5, atol=1e-6)
    # as in sparsify, only y's decoder rows are held at unit norm; x's, an average, are close
    y_rows = checkpoint["state_dict"]["saes.0.W_dec"].norm(dim=1)
    torch.testing.assert_close(y_rows, torch.ones_like(y_rows), rtol=1e-5, atol=1e-5)
    assert float((module.saes[0].W_dec.norm(dim=1) - 1).abs().max()) < 0.2


def test_held_out_evaluations_during_signum_training_see_x(runs):
    """The evaluation at the last step (weights still at y, in train mode) logs the FVU that the
    final evaluation of the saved SAE (x) finds on the same held-out contexts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["saving"]
    events = EventAccumulator(str(run.out / "tensorboard")).Reload()
    logged = {e.step: e.value for e in events.Scalars(f"eval/fvu/{run.module.sae_name(0)}")}
    assert sorted(logged) == [20, STEPS]
    assert logged[STEPS] == pytest.approx(run.metrics[0]["fvu"], rel=1e-4)
    assert logged[20] > logged[STEPS]


def test_checkpoints_and_held_out_evaluations_leave_signum_training_unchanged_and_resume_exactly(runs):
    # Exactly equal: moving the weights to x and back (sparsify's eval()/train() around a save) would
    # leave rounding errors, which sign steps can turn into whole steps.
    whole = load_sae(runs["tmp"] / "whole")
    for other in ("saving", "resumed"):
        sae = load_sae(runs["tmp"] / other)
        for name, value in whole.state_dict().items():
            torch.testing.assert_close(sae.state_dict()[name], value, rtol=0, atol=0, msg=f"{other} {name}")
    assert runs["resumed"].metrics[0]["fvu"] == pytest.approx(runs["whole"].metrics[0]["fvu"], rel=1e-5)


def test_resuming_a_signum_checkpoint_with_adam_is_refused(runs):
    config = TrainConfig(**{**runs["base"], "optimizer": "adam"}, resume=str(runs["ckpt"] / "step20.ckpt"),
                         out=str(runs["tmp"] / "wrong"))
    with pytest.raises(FeatoptError, match="was trained with --optimizer signum, not adam"):
        train(config)


def test_an_unknown_optimizer_is_refused_in_one_sentence_naming_both():
    with pytest.raises(FeatoptError) as error:  # checked before anything loads
        train(TrainConfig(model="tiny-llama", corpus="x", optimizer="sgd"))
    assert str(error.value) == "--optimizer 'sgd' is not known: allowed are adam, signum."


def test_two_processes_hand_the_main_process_x():
    """With ddp_spawn the main process gets the workers' weights but no optimizer: they must be x
    already (moved there at the end of training), the SAE one process trains."""
    from featopt.runs.lightning import StepsDataModule
    from tests.sae.test_train import _module, _trainer

    one = _module(optimizer="signum", lrs=[1e-2])
    _trainer(12).fit(one, datamodule=StepsDataModule(12))
    two = _module(optimizer="signum", lrs=[1e-2])
    _trainer(12, devices=2, strategy="ddp_spawn").fit(two, datamodule=StepsDataModule(12))
    for name, value in one.export(0).state_dict().items():
        torch.testing.assert_close(two.export(0).state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
