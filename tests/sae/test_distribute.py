"""SAEs divided among ranks (`--distribute_modules`): two processes, each holding and stepping only
its share of four SAEs, train the SAEs one process trains; their checkpoints resume either way."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch

from featopt.dictionaries import distribute
from featopt.dictionaries.train import SAETraining
from featopt.models.sae.model import SAEConfig
from featopt.runs.lightning import StepsDataModule, UnwrappedDDPStrategy, resolve_strategy
from tests.sae.synthetic import IN_SITE, OUT_SITE, make_planted_mlp

SOURCE = dict(n_contexts=96, context_length=17)


class Recording(SAETraining):
    """Writes, per rank, which SAEs got gradients at some step and how many SAE parameters it held."""

    def __init__(self, *args, record=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.record, self.stepped = record, set()

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.stepped |= {i for i, sae in enumerate(self.saes) if any(p.grad is not None for p in sae.parameters())}

    def on_train_end(self) -> None:
        if self.record:  # before the end's gathering onto rank 0
            held = [sum(p.numel() for p in sae.parameters()) for sae in self.saes]
            path = f"{self.record}/rank{self.trainer.global_rank}.json"
            with open(path, "w") as f:
                json.dump({"stepped": sorted(self.stepped), "held": held, "owners": self.owners}, f)
        super().on_train_end()


def _module(distributed=False, record=None, optimizer="adam"):
    # two sites x two sizes: four SAEs of different parameter counts
    configs = [SAEConfig(d_in=d, d_sae=n, architecture="topk", k=3, hook_name=site.name)
               for site, d in ((IN_SITE, 16), (OUT_SITE, 12)) for n in (24, 48)]
    return Recording(configs, None, functools.partial(make_planted_mlp, **SOURCE), n_contexts=96, context_length=17,
                     batch_tokens=64, buffer_batches=4, seed=0, lrs=[3e-3] * 4, warmup_steps=3, dead_tokens=300,
                     optimizer=optimizer, distribute=distributed, record=record)


def _trainer(steps, devices=1, **kwargs):
    strategy = UnwrappedDDPStrategy(start_method="spawn") if devices > 1 else "auto"
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=bool(kwargs.get("callbacks")),
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=devices,
                     strategy=strategy, **kwargs)


def _assert_same(got, want):
    for i, (a, b) in enumerate(zip(got.saes, want.saes)):
        for name, value in b.state_dict().items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(a.state_dict()[name], value, rtol=0, atol=1e-5 * scale, msg=f"sae {i} {name}")
        torch.testing.assert_close(getattr(got, f"since_fired_{i}"), getattr(want, f"since_fired_{i}"))
    torch.testing.assert_close(got.scales, want.scales)


def test_owners_balance_parameters_and_give_every_rank_one():
    assert distribute.assign_owners([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    # the largest first, each to the lighter rank: 100 | 50 50 | then the ones alternate
    assert distribute.assign_owners([100, 1, 1, 1, 50, 50], 2) == [0, 0, 1, 0, 1, 1]
    owners = distribute.assign_owners([5] * 30, 8)
    assert sorted(set(owners)) == list(range(8)) and max(map(owners.count, range(8))) == 4


def test_optimizer_and_schedule_states_split_and_merge_back():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(5)]
    groups = [{"params": params[:2], "lr": 1.0}, {"params": params[2:3], "lr": 2.0}, {"params": params[3:], "lr": 3.0}]
    opt = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    sum(p.sum() for p in params).backward()
    opt.step()
    schedule.step()
    full, full_schedule = opt.state_dict(), schedule.state_dict()
    owned = [[0, 2], [1]]
    parts = [(o, distribute.split_optimizer(full, o)) for o in owned]
    assert [g["lr"] for g in parts[0][1]["param_groups"]] == [0.5, 1.5]
    assert parts[0][1]["param_groups"][1]["params"] == [2, 3]
    merged = distribute.merge_optimizer(parts)
    assert [g["params"] for g in merged["param_groups"]] == [[0, 1], [2], [3, 4]]
    for k, state in full["state"].items():
        torch.testing.assert_close(merged["state"][k]["exp_avg"], state["exp_avg"])
    schedules = [(o, distribute.split_scheduler(full_schedule, o)) for o in owned]
    assert schedules[0][1]["base_lrs"] == [1.0, 3.0]
    assert distribute.merge_scheduler(schedules) == full_schedule


def test_two_ranks_each_train_their_share_as_one_process_trains_all(tmp_path):
    """signum (schedule-free): the end moves each owner's SAEs to x before rank 0 gathers them; the
    checkpoints rank 0 writes have a one-process run's layout, and either kind of run resumes them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    one = _module(optimizer="signum")
    _trainer(10).fit(one, datamodule=StepsDataModule(10))
    two = _module(distributed=True, record=str(tmp_path), optimizer="signum")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="s{step}",
                                 auto_insert_metric_name=False)
    _trainer(10, devices=2, callbacks=[checkpoint]).fit(two, datamodule=StepsDataModule(10))
    _assert_same(two, one)  # rank 0 gathered every SAE; the main process took its state
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    owners = ranks[0]["owners"]
    assert sorted(set(owners)) == [0, 1]
    sizes = [sum(p.numel() for p in sae.parameters()) for sae in one.saes]
    for r, rank in enumerate(ranks):
        mine = [i for i, o in enumerate(owners) if o == r]
        assert rank["stepped"] == mine  # only its own SAEs got gradients and steps
        assert rank["held"] == [sizes[i] if i in mine else 0 for i in range(4)]  # and it held no other

    saved = torch.load(tmp_path / "s5.ckpt", weights_only=False)  # the layout of a one-process run's
    assert saved["state_dict"]["saes.1.W_enc"].shape == (16, 48)
    assert len(saved["optimizer_states"][0]["param_groups"]) == 4
    resumed_one = _module(optimizer="signum")
    _trainer(10).fit(resumed_one, datamodule=StepsDataModule(10), ckpt_path=str(tmp_path / "s5.ckpt"))
    _assert_same(resumed_one, one)
    resumed_two = _module(distributed=True, optimizer="signum")
    _trainer(10, devices=2).fit(resumed_two, datamodule=StepsDataModule(10), ckpt_path=str(tmp_path / "s5.ckpt"))
    _assert_same(resumed_two, one)
    solo = _module(distributed=True, optimizer="signum")  # one process: it owns them all
    _trainer(10).fit(solo, datamodule=StepsDataModule(10))
    _assert_same(solo, one)


def test_strategies_that_wrap_the_module_are_refused():
    from featopt.errors import FeatoptError

    assert isinstance(resolve_strategy("auto", 2, "cpu", unwrapped=True), UnwrappedDDPStrategy)
    assert resolve_strategy("auto", 1, "cpu", unwrapped=True) == "auto"  # one process: nothing to divide
    assert resolve_strategy("auto", 1, "cpu", num_nodes=2) == "ddp"  # several nodes: each launched by its own
    with pytest.raises(FeatoptError, match="--strategy fsdp"):
        resolve_strategy("fsdp", 2, "cpu", unwrapped=True)
