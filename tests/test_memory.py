"""Big allocations are sized against free memory before they are made (featopt.memory): with a
monkeypatched "available memory", a batch shrinks and gives the same answer, or one sentence names
the flag to lower."""

from __future__ import annotations

import pytest
import torch

from featopt import memory
from featopt.cli import main
from featopt.errors import FeatoptError
from featopt.dictionaries.activations import ActivationStream
from featopt.weights import decode as decode_module
from featopt.weights.decode import Unembed, decode_directions


def _available(monkeypatch, nbytes: int | None) -> list:
    """Pretend `nbytes` are free; returns the list of devices asked about."""
    asked: list = []
    monkeypatch.setattr(memory, "available", lambda device="cpu": asked.append(str(device)) or nbytes)
    return asked


def test_available_reads_memavailable():
    free = memory.available("cpu")
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
    assert free is not None and abs(free - int(line.split()[1]) * 1024) < 2**30  # within a GiB of a moment later


def test_fit_batch_halves_until_it_fits_and_names_the_flag_when_nothing_does(monkeypatch):
    _available(monkeypatch, 1000)  # 800 usable
    assert memory.fit_batch(64, 10, "cpu", flag="--batch_size") == 64
    assert memory.fit_batch(64, 100, "cpu", flag="--batch_size") == 8
    assert memory.fit_batch(64, 100, "cpu", flag="--batch_size", fixed=500) == 2
    with pytest.raises(FeatoptError, match=r"--batch_size 1.*or --batch_size\.$"):
        memory.fit_batch(64, 900, "cpu", flag="--batch_size")
    _available(monkeypatch, None)  # unknown: nothing is limited
    assert memory.fit_batch(64, 10**15, "cpu", flag="--batch_size") == 64


def test_neuron_decoding_shrinks_its_chunk_and_gives_the_same_tokens(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    W, directions = torch.randn(300, 16, generator=gen), torch.randn(40, 16, generator=gen)
    monkeypatch.setattr(decode_module.native, "kernel", lambda: None)
    chunks: list[int] = []
    real_fit = memory.fit_batch
    monkeypatch.setattr(memory, "fit_batch", lambda *a, **k: chunks.append(real_fit(*a, **k)) or chunks[-1])
    _available(monkeypatch, int(5 * 100 * (4 + 12) / memory.HEADROOM))  # room for 5 rows of 100 tokens: 32 halves to 4
    small = decode_directions(directions, Unembed(W), k=5, mean_of=5, vocab_chunk=100, row_chunk=32)
    assert chunks == [4]
    probs = torch.softmax(directions @ W.T, dim=1)  # brute force: the whole [N, V] at once
    top = probs.topk(5, dim=1)
    assert torch.equal(small.ids, top.indices)
    torch.testing.assert_close(small.probs, top.values, rtol=1e-4, atol=1e-6)


def _model_fits(monkeypatch) -> None:
    """The model itself is let in (its own check before loading is tests/test_memory_estimate.py's): what
    is tested is the check of a later allocation."""
    monkeypatch.setattr(memory, "check_model", lambda *a, **k: None)


def test_neurons_decode_that_cannot_fit_names_row_chunk(monkeypatch, tmp_path, capsys):
    _available(monkeypatch, 1000)
    _model_fits(monkeypatch)
    code = main(["neurons", "decode", "--model", "tiny-gpt2", "--no_progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("featopt: error: decoding directions through the LM head needs ") and "--row_chunk" in err
    assert not (tmp_path / "out" / "neurons.json").exists()


class _Source:
    n_contexts, token_bytes = 64, 8 * 1024

    def __call__(self, index):
        raise AssertionError("allocated a buffer that does not fit")


def test_an_sae_buffer_that_cannot_fit_names_the_flags(monkeypatch):
    _available(monkeypatch, 2**20)
    stream = ActivationStream(_Source(), 64, 17, batch_tokens=64, buffer_batches=16, skip_first=1)
    with pytest.raises(FeatoptError, match="the SAE training buffer needs .* lower --buffer_batches or --batch_size"):
        stream.batch(0)


def test_the_sweep_batch_shrinks_to_what_fits_with_the_same_answer(monkeypatch, tmp_path, capsys):
    from featopt.models import load_model
    from featopt.results import read_results

    argv = ["search", "exhaustive", "--model", "tiny-gpt2", "--features", "[:, :, 0-2]", "--no_progress"]
    assert main([*argv, "--out", str(tmp_path / "plenty")]) == 0
    sizes: list[int] = []
    real_fit = memory.fit_batch
    monkeypatch.setattr(memory, "fit_batch", lambda *a, **k: sizes.append(real_fit(*a, **k)) or sizes[-1])
    row = memory.forward_row_bytes(load_model("tiny-gpt2").model.config, 1)
    _available(monkeypatch, int(row * 8 / memory.HEADROOM) + 1)
    _model_fits(monkeypatch)
    assert main([*argv, "--out", str(tmp_path / "tight")]) == 0
    capsys.readouterr()
    assert sizes and set(sizes) == {8}
    plenty, tight = (read_results(tmp_path / name)[1] for name in ("plenty", "tight"))
    assert [r.token_ids for r in tight] == [r.token_ids for r in plenty]
    assert [r.activation for r in tight] == pytest.approx([r.activation for r in plenty], rel=1e-5)
