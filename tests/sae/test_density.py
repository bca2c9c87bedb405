"""The latent density histogram: its counts against numpy's histogram of log10 frequencies, the
PNG it writes, and `featopt sae eval` writing one per SAE beside metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from featopt.dictionaries.density import density_histogram, plot_density
from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.models.sae.formats import save_sae
from tests.sae.test_evaluate import identity_sae, topk_sae

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    if path.read_bytes()[:8] != PNG_SIGNATURE:
        return False
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
        return image.format == "PNG"


def test_histogram_counts_equal_numpy():
    freq = torch.tensor([0.0, 0.0, 0.0, 1e-4, 3e-4, 0.002, 0.05, 0.05, 0.5, 1.0], dtype=torch.float64)
    hist = density_histogram(freq, bins=8)
    assert hist.dead == 3 and hist.latents == 10
    live = np.log10(freq[freq > 0].double().numpy())
    assert hist.edges[0].item() == -4.0 and hist.edges[-1].item() == 0.0  # the rarest live latent's decade, to 10^0
    expected, _ = np.histogram(live, bins=hist.edges.numpy())  # numpy's last bin includes its right edge too
    np.testing.assert_array_equal(hist.counts.numpy(), expected)
    assert hist.counts.sum().item() == 7
    # float32 (as evaluate gives them): 1e-4 is a hair below 10^-4 there, still in the first bin
    assert torch.equal(density_histogram(freq.float(), bins=8).counts, hist.counts)


def test_histogram_edge_cases_and_bad_input():
    dead = density_histogram(torch.zeros(5), bins=4)
    assert dead.dead == 5 and dead.counts.sum() == 0 and dead.edges[0].item() == -1.0
    live = density_histogram(torch.tensor([0.5, 0.5, 1.0]), bins=4)  # log10(0.5) = -0.30; 1.0 in the last bin
    assert live.dead == 0 and live.counts.tolist() == [0, 0, 2, 1]
    for bad in (torch.tensor([0.5, 1.5]), torch.tensor([-0.1]), torch.tensor([float("nan")]), torch.zeros(0)):
        with pytest.raises(FeatoptError):
            density_histogram(bad)


def test_plot_writes_a_png(tmp_path):
    freq = torch.cat([torch.zeros(10), torch.logspace(-5, 0, 90)])
    path = plot_density(freq, tmp_path / "sub" / "d.png", title="an SAE", tokens=100_000)
    assert path == tmp_path / "sub" / "d.png" and is_png(path)
    assert is_png(plot_density(torch.zeros(4), tmp_path / "dead.png"))  # all dead: still a figure


def test_eval_command_writes_one_histogram_per_sae_and_names_it(tmp_path):
    from featopt.commands.sae_eval import EvalConfig
    from featopt.commands.sae_eval import evaluate as eval_command

    llama = load_model("tiny-llama")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 12)
    folders = [tmp_path / "topk", tmp_path / "identity", tmp_path / "again" / "topk"]  # two folders named topk
    for folder, sae in zip(folders, [topk_sae(), identity_sae(), topk_sae(seed=5)]):
        save_sae(sae, folder)
    out = tmp_path / "eval"
    run = eval_command(EvalConfig(model="tiny-llama", sae=",".join(map(str, folders)), corpus=str(corpus), split="all",
                                  context_length=12, contexts=4, batch_contexts=2, out=str(out), progress=False), llama)
    document = json.loads((out / "metrics.json").read_text())
    names = [entry["density_plot"] for entry in document["saes"]]
    assert names == ["topk_density.png", "identity_density.png", "topk-2_density.png"]
    assert run.plots == [out / name for name in names] and run.images() == sorted(run.plots)
    for name in names:
        assert is_png(out / name)
    for entry in document["saes"]:
        assert "firing_frequency" not in entry["metrics"]  # drawn, not written
        assert entry["metrics"]["kl_div"] >= 0 and entry["metrics"]["kl_zero"] > 0
    assert document["saes"][1]["metrics"]["kl_div"] == 0.0  # the identity SAE changes no prediction
    assert "kl_div" in run.table() and "kl_zero" in run.table()
