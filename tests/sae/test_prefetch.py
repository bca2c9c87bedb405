"""`sae train --sae_device`: the next buffer's activations computed in a background thread while the
SAEs train (`featopt/dictionaries/prefetch.py`) give exactly the batches, and so the SAEs, of a run
without it; the forward of every buffer after the first runs in that thread."""

from __future__ import annotations

import threading

import pytest
import torch

from featopt.cli import main
from featopt.dictionaries.activations import ActivationStream, ModelSource
from featopt.dictionaries.prefetch import Prefetching, split_devices
from featopt.errors import FeatoptError
from featopt.models.sae.formats import load_sae

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
TRAIN = ["--model", "tiny-llama", "--site", "blocks.1.resid_post", "--context_length", "16", "--batch_size", "64",
         "--tokens", "1280", "--buffer_batches", "2", "--k", "4", "--eval_contexts", "4", "--eval_every", "5",
         "--no_progress", "--optimizer", "adam"]


class Counting:
    """A source whose activations are a function of the context index, recording which thread ran it."""

    token_bytes, n_contexts = 8, 40

    def __init__(self):
        self.threads = []

    def __call__(self, index):
        self.threads.append(threading.current_thread().name)
        return {"site": index[:, None, None].float() + torch.arange(6.0)[None, :, None]}


def test_a_prefetched_stream_gives_the_same_batches():
    plain, ahead = Counting(), Counting()
    streams = [ActivationStream(source, 40, 6, batch_tokens=7, buffer_batches=3, seed=1, world=2, rank=1)
               for source in (plain, Prefetching(ahead))]
    for step in range(20):  # seven buffers
        a, b = (s.batch(step)["site"] for s in streams)
        assert torch.equal(a, b)
    streams[1].source.close()
    assert all(name == "MainThread" for name in plain.threads)
    # the first buffer is computed when asked for; every later one ahead, in the thread (one more is in flight)
    assert ahead.threads[0] == "MainThread" and len(ahead.threads) == len(plain.threads) + 1
    assert all(name.startswith("featopt-prefetch") for name in ahead.threads[1:])


def test_a_prefetch_of_other_contexts_is_not_used():
    source = Prefetching(Counting())
    source.prefetch(torch.tensor([1, 2]))
    out = source(torch.tensor([3]))  # not what was prefetched: computed now
    assert torch.equal(out["site"][:, 0, 0], torch.tensor([3.0]))
    source.close()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT.upper())
    return folder


def test_sae_device_trains_the_same_saes(tmp_path, corpus, monkeypatch):
    threads = []
    original = ModelSource.__call__

    def recording(self, index):
        threads.append(threading.current_thread().name)
        return original(self, index)

    monkeypatch.setattr(ModelSource, "__call__", recording)
    assert main(["sae", "train", *TRAIN, "--corpus", str(corpus), "--out", str(tmp_path / "plain")]) == 0
    assert set(threads) == {"MainThread"}
    threads.clear()
    assert main(["sae", "train", *TRAIN, "--corpus", str(corpus), "--out", str(tmp_path / "ahead"),
                 "--sae_device", "cpu"]) == 0
    assert any(name.startswith("featopt-prefetch") for name in threads)
    a, b = load_sae(tmp_path / "plain").state_dict(), load_sae(tmp_path / "ahead").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # same process, same batches, same order


def test_split_devices():
    assert split_devices("cpu", "auto", 1)[:2] == ("cpu", 1)
    with pytest.raises(FeatoptError, match="not a device"):
        split_devices("cuda:x", "auto", 1)
    if torch.cuda.device_count() == 0:
        with pytest.raises(FeatoptError, match="does not have"):
            split_devices("cuda:0", "auto", 1)
