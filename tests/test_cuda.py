"""CUDA-only checks of issue 27's pieces (run by benchmarks/gpu_check.sh on a lent GPU machine; skipped
without CUDA): a memory-mapped SAE moved to the GPU, the chunked all-latent sweep there, and SAE
training with the SAEs on the GPU and the model's next buffer prefetched."""

from __future__ import annotations

import pytest
import torch

from featopt.discrete.exhaustive import exhaustive
from featopt.models import load_model
from featopt.models.sae import SAEConfig, SparseAutoencoder
from featopt.models.sae.formats import load_sae, save_sae
from featopt.objectives import latent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sae(d_in: int, d_sae: int = 3001) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu",
                                      hook_name="blocks.1.hook_resid_post", apply_b_dec_to_input=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        sae.threshold.abs_()
    return sae


def test_cuda_mapped_sae_encodes_like_the_cpu(tmp_path):
    save_sae(_sae(64), tmp_path / "sae")
    mapped = load_sae(tmp_path / "sae")
    x = torch.randn(32, 64)
    torch.testing.assert_close(mapped.to("cuda").encode(x.cuda()).cpu(), load_sae(tmp_path / "sae").encode(x),
                               rtol=1e-4, atol=1e-4)


def test_cuda_chunked_sweep_finds_the_cpu_answers():
    cpu = load_model("tiny-llama")
    sae = _sae(cpu.d_model)
    answers = {}
    for device in ("cpu", "cuda"):
        adapter = cpu if device == "cpu" else load_model("tiny-llama", device="cuda")
        topk = exhaustive(adapter, latent(sae.to(device), "[:, :, 0-3000]"), k=1, latent_chunk=701, progress=False)
        answers[device] = (topk.ids[0].cpu(), topk.values[0].double().cpu())
    fired = answers["cpu"][1] > 1e-3  # latents that fire clearly: the best token is well defined
    assert fired.sum() > 100
    assert (answers["cpu"][0][fired] == answers["cuda"][0][fired]).float().mean() > 0.99


def test_cuda_sae_device_trains(tmp_path):
    from featopt.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat. The dog ran to the park and back again. " * 40)
    assert main(["sae", "train", "--model", "tiny-llama", "--site", "blocks.1.resid_post", "--context_length", "16",
                 "--batch_size", "128", "--tokens", "2560", "--buffer_batches", "2", "--k", "4", "--eval_contexts", "4",
                 "--no_progress", "--corpus", str(corpus), "--sae_device", "cuda:0", "--out", str(tmp_path / "sae")]) == 0
    assert load_sae(tmp_path / "sae").W_enc.isfinite().all()
