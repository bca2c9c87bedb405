"""Latent-sharded SAE training (`sharded.py`): two CPU ranks under Lightning's ModelParallelStrategy
take the steps the unsharded trainer takes (same start, same batches: the losses of every step and
the final weights agree up to float rounding, relu and topk with AuxK), the exported SAE is an
ordinary one, and the selection of topk's kept latents over shards follows its tie rule.

ModelParallelStrategy re-runs the launching script for its other ranks, so the sharded run is a
script of its own in a subprocess (re-running pytest would be wrong)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from featopt.dictionaries.train import SAETraining
from featopt.errors import FeatoptError
from featopt.models.sae.formats import load_sae
from featopt.models.sae.model import SAEConfig
from featopt.models.sae.sharded import keep_among, top_candidates
from featopt.runs.lightning import StepsDataModule
from tests.sae.synthetic import SITE, SparseSource, make_source

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
CONFIGS = [dict(d_in=16, d_sae=64, architecture="topk", k=4, hook_name=SITE.name),
           dict(d_in=16, d_sae=48, architecture="relu", hook_name=SITE.name)]
# small dead_tokens: most latents are dead after the first step, so AuxK takes part
SETTINGS = dict(n_contexts=96, context_length=17, batch_tokens=64, buffer_batches=4, seed=0, lrs=[3e-3, 3e-3],
                warmup_steps=2, decay_fraction=0.25, dead_tokens=64, l1=0.5, optimizer="adam")
SOURCE = functools.partial(make_source, n_contexts=96, context_length=17)

# Run by the test as `python script.py OUT`; ModelParallelStrategy re-runs it as rank 1.
SCRIPT = textwrap.dedent("""
    import functools, sys
    from pathlib import Path
    import lightning as L
    import torch
    from featopt.dictionaries.sharded import ShardedSAETraining, strategy
    from featopt.models.sae.formats import save_sae
    from featopt.models.sae.model import SAEConfig
    from featopt.runs.lightning import StepsDataModule
    from tests.sae.test_sharded import CONFIGS, SETTINGS, SOURCE, STEPS, recording

    import featopt.models.sae.sharded as sharded
    sharded._GATHER_ELEMENTS = 40  # the export gathers in several pieces per weight

    out = Path(sys.argv[1])
    module = recording(ShardedSAETraining)([SAEConfig(**c) for c in CONFIGS], None, SOURCE,
                                           **SETTINGS)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(2), max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=StepsDataModule(STEPS))
    shapes = [tuple(p.to_local().shape) for p in module.saes[0].parameters()]
    adam = trainer.optimizers[0].state
    shapes += [tuple(adam[p][key].to_local().shape) for p in module.saes[0].parameters() for key in ("exp_avg", "exp_avg_sq")]
    if trainer.is_global_zero:
        saes = [module.export(i) for i in range(len(CONFIGS))]
        for i, sae in enumerate(saes):
            save_sae(sae, out / f"sae{i}")
        torch.save({"losses": module.losses, "shapes": shapes}, out / "run.pt")
""")


def recording(cls):
    """`cls` that records every SAE's loss of every step in `losses[i]`, and its dead latents in `dead[i]`."""
    class Recording(cls):
        def _losses(self, i, sae, x, y, total_var):
            loss, stats = super()._losses(i, sae, x, y, total_var)
            self.__dict__.setdefault("losses", {}).setdefault(i, []).append(float(loss.detach()))
            dead = int((getattr(self, f"since_fired_{i}") >= self.dead_tokens).sum())  # this rank's
            self.__dict__.setdefault("dead", {}).setdefault(i, []).append(dead)
            return loss, stats
    return Recording


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`(sharded, unsharded)`: `(losses {i: [STEPS]}, exported SAEs, rank 0's shapes)` and `(losses, exported SAEs)`."""
    tmp = tmp_path_factory.mktemp("sharded")
    (tmp / "run_sharded.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(tmp / "run_sharded.py"), str(tmp)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = torch.load(tmp / "run.pt")
    sharded = (record["losses"], [load_sae(tmp / f"sae{i}") for i in range(len(CONFIGS))], record["shapes"])

    module = recording(SAETraining)([SAEConfig(**c) for c in CONFIGS], None, SOURCE, **SETTINGS)
    L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              log_every_n_steps=1).fit(module, datamodule=StepsDataModule(STEPS))
    assert max(module.dead[0]) > 0  # AuxK took part in the topk SAE's loss
    return sharded, (module.losses, [module.export(i) for i in range(len(CONFIGS))])


def test_every_step_loss_and_the_final_weights_equal_the_unsharded_run(runs):
    (losses, saes, shapes), (ref_losses, ref_saes) = runs
    # rank 0 held half of the topk SAE's 64 latents, and Adam's state of them only
    assert shapes == [(16, 32), (32,), (32, 16), (16,)] + [s for s in [(16, 32), (32,), (32, 16), (16,)] for _ in "ab"]
    for i in range(len(CONFIGS)):
        assert len(losses[i]) == len(ref_losses[i]) == STEPS
        torch.testing.assert_close(torch.tensor(losses[i]), torch.tensor(ref_losses[i]), rtol=1e-5, atol=1e-6)
        assert ref_losses[i][-1] < ref_losses[i][0]  # it trained
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(saes[i], name), getattr(ref_saes[i], name), rtol=1e-4, atol=1e-5)


def test_the_exported_sae_loads_and_encodes_like_the_unsharded_one(runs):
    (_, saes, _), (_, ref_saes) = runs
    x = SparseSource(n_contexts=96, context_length=17).acts.reshape(-1, 16)[:200]
    for sae, ref in zip(saes, ref_saes):
        assert type(sae) is type(ref) and sae.cfg.d_sae == ref.cfg.d_sae and sae.cfg.k == ref.cfg.k
        with torch.no_grad():
            z, z_ref = sae.encode(x), ref.encode(x)
            torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sae(x), ref(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(z > 0, z_ref > 0)


def _reference_keep(values: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule by brute force: sort each row by (value descending, column ascending), keep k."""
    n, c = values.shape
    keep = torch.zeros(n, c, dtype=torch.bool)
    for r in range(n):
        order = sorted(range(c), key=lambda j: (-float(values[r, j]), j))[:k]
        keep[r, order] = True
    return keep


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shards_proposals_then_the_global_choice_keep_the_k_largest_lower_latent_on_ties(shards):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randint(-3, 4, (40, 32), generator=gen).float()  # many ties at every cut
    pre[:20] = torch.randn(20, 32, generator=gen)  # and rows without
    k = 5
    m = 32 // shards
    proposals, columns = [], []
    for r in range(shards):
        cols, values = top_candidates(pre[:, r * m:(r + 1) * m], k)
        assert torch.all(cols[:, 1:] > cols[:, :-1])  # columns ascending
        torch.testing.assert_close(values, pre[:, r * m:(r + 1) * m].gather(1, cols), rtol=0, atol=0)
        proposals.append(torch.cat([values, values.new_full((40, k - values.shape[1]), float("-inf"))], 1))
        columns.append(cols + r * m)
    keep = keep_among(torch.cat(proposals, 1), k)
    kept = torch.zeros(40, 32, dtype=torch.bool)
    for r in range(shards):
        mine = keep[:, r * k:r * k + columns[r].shape[1]]
        rows, slots = mine.nonzero(as_tuple=True)
        kept[rows, columns[r][rows, slots]] = True
    assert torch.equal(kept, _reference_keep(pre, k))
    # without ties: the same set as torch.topk's
    assert torch.equal(kept[:20], torch.zeros(20, 32, dtype=torch.bool).scatter(1, pre[:20].topk(k).indices, True))


TEXT = "The cat sat on the mat. The dog ran to the park and back again. " * 30
TRAIN = ["sae", "train", "--model", "tiny-llama", "--site", "blocks.1.resid_post", "--context_length", "16",
         "--batch_size", "128", "--tokens", "1280", "--buffer_batches", "2", "--k", "4", "--eval_contexts", "4",
         "--accelerator", "cpu", "--no_progress"]


def test_the_command_line_trains_and_saves_the_sae_the_unsharded_command_does(tmp_path):
    from featopt.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "featopt", *TRAIN, "--corpus", str(corpus), "--out", str(tmp_path / "sharded"),
                           "--shard_latents", "--devices", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main([*TRAIN, "--corpus", str(corpus), "--out", str(tmp_path / "plain")]) == 0
    sharded, plain = load_sae(tmp_path / "sharded"), load_sae(tmp_path / "plain")
    assert sharded.cfg.d_sae == plain.cfg.d_sae == 4 * plain.cfg.d_in and sharded.cfg.hook_name == plain.cfg.hook_name
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    record = json.loads((tmp_path / "sharded" / "training.json").read_text())
    assert record["run"]["config"]["shard_latents"] is True and record["saes"][0]["hash"] == sharded.content_hash()
    assert 0 <= record["saes"][0]["metrics"]["fvu"] < 1


def test_unsupported_settings_are_refused_in_one_sentence():
    from featopt.dictionaries.sharded import ShardedSAETraining, check_settings
    from featopt.models.sae.sharded import check_shardable

    with pytest.raises(FeatoptError, match="relu or topk"):
        ShardedSAETraining([SAEConfig(d_in=16, d_sae=64, architecture="jumprelu", hook_name=SITE.name)], None,
                           SOURCE, **SETTINGS)
    with pytest.raises(FeatoptError, match="divisible by 3"):
        check_shardable(SAEConfig(d_in=16, d_sae=64, architecture="relu"), 3)

    class Settings:
        architecture, devices, num_nodes, precision, strategy = "topk", 2, 1, "32-true", "auto"
        eval_every, checkpoint_every, resume, target_site, distribute_modules = 0, 0, None, None, False

    check_settings(Settings())
    for field, value, words in [("architecture", "batchtopk", "relu or topk"), ("devices", 1, "--devices 2 or more"),
                                ("num_nodes", 2, "--num_nodes 1"), ("precision", "bf16-mixed", "32-true"),
                                ("strategy", "ddp", "ModelParallelStrategy"), ("eval_every", 5, "--eval_every"),
                                ("checkpoint_every", 10, "--checkpoint_every"),
                                ("resume", "x.ckpt", "--resume"), ("target_site", "mlp_out", "transcoders"),
                                ("distribute_modules", True, "--distribute_modules")]:
        settings = Settings()
        setattr(settings, field, value)
        with pytest.raises(FeatoptError, match=words):
            check_settings(settings)
