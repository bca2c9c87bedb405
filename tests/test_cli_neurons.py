"""`featopt neurons decode|find|compare|clamp` on the command line (the numbers themselves are
checked against independent computations in tests/weights and tests/interventions)."""

from __future__ import annotations

import json

import torch

from featopt.cli import main
from featopt.models import load_model


def test_neurons_decode_top_token_is_the_full_softmax_argmax(tmp_path, capsys):
    assert main(["neurons", "decode", "--model", "tiny-gpt2", "--top_k", "3", "--out", str(tmp_path), "--no_progress"]) == 0
    assert "neurons decoded" in capsys.readouterr().out
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "neurons.safetensors")
    ids = tensors["layers.0.ids"]
    adapter = load_model("tiny-gpt2")
    up = adapter.model.transformer.h[0].mlp.c_fc.weight.T  # GPT-2 Conv1D: [d, neurons] -> [neurons, d]
    logits = adapter.lm_head(up)  # no final norm: the default
    assert torch.equal(ids[:, 0], logits.argmax(-1))


def test_neurons_find_compare_clamp_write_their_files(tmp_path):
    assert main(["neurons", "find", "--model", "tiny-llama", "--token", " the", "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "find.png").stat().st_size > 0
    assert main(["neurons", "compare", "--model", "tiny-llama", "--out", str(tmp_path / "c")]) == 0
    document = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert all(row["share"] == 1.0 for row in document["layers"])  # a model against itself
    assert main(["neurons", "clamp", "--model", "tiny-llama", "--layer", "1", "--neuron", "3", "--prompt", "the sea",
                 "--target", " the", "--values=-50:50:5", "--out", str(tmp_path / "k")]) == 0
    clamp = json.loads((tmp_path / "k" / "clamp.json").read_text())
    assert len(clamp["values"]) == len(clamp["probs"]) == 5 and (tmp_path / "k" / "clamp.png").exists()
    assert main(["neurons", "clamp", "--model", "tiny-llama", "--layer", "9", "--neuron", "3", "--prompt", "x",
                 "--target", " the", "--out", str(tmp_path / "bad")]) == 2
