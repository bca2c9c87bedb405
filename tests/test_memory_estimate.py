"""The memory estimate before loading: `featopt.memory.estimate` from the config alone, and one
sentence instead of an out-of-memory kill when the model cannot fit (free memory monkeypatched)."""

from __future__ import annotations

import pytest
import torch

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.models.tiny import build_tiny

GIB = 2**30


def test_estimate_counts_the_weights_in_the_dtype_and_a_small_forward():
    model, _ = build_tiny("tiny-llama")
    numel = sum(p.numel() for p in model.parameters())  # tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.parameter_bytes(model.config, torch.float32) == 4 * numel + buffers
    assert memory.parameter_bytes(model.config, torch.bfloat16) == 2 * numel + buffers
    work = memory.forward_row_bytes(model.config, 64, logits=True) * 8
    assert memory.estimate(model.config, torch.float32) == 4 * numel + buffers + work
    assert memory.estimate(model.config, torch.bfloat16) == 2 * numel + buffers + work // 2
    assert memory.estimate(model.config, torch.float32, tokens=16, batch=1) < memory.estimate(model.config, torch.float32)


def _free(monkeypatch, free: dict[str, int]):
    monkeypatch.setattr(memory, "available", lambda device="cpu": free.get(str(torch.device(device)), None))


def test_a_model_that_cannot_fit_is_one_sentence_naming_the_fixes(monkeypatch):
    _free(monkeypatch, {"cpu": 100_000})
    with pytest.raises(FeatoptError) as e:
        load_model("tiny-llama")
    text = str(e.value)
    assert text.startswith("model tiny-llama needs ~") and " in float32, but 97.7 KiB is free on cpu" in text
    assert "try --dtype bfloat16, --device_map auto with --max_memory, or a smaller model." in text
    assert text.count(".") <= 3 and "\n" not in text
    with pytest.raises(FeatoptError) as e:  # already half precision: bfloat16 is not suggested again
        load_model("tiny-llama", dtype=torch.bfloat16)
    assert "in bfloat16" in str(e.value) and "--dtype" not in str(e.value)


def test_enough_memory_loads_and_unknown_memory_is_not_limited(monkeypatch):
    _free(monkeypatch, {"cpu": 64 * GIB})
    assert load_model("tiny-llama").n_layers == 3
    _free(monkeypatch, {})  # available() says None: nothing to compare with
    assert load_model("tiny-gpt2").n_layers == 3


def test_a_device_map_counts_its_devices_and_the_disk_is_unlimited(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path))
    _free(monkeypatch, {"cpu": 100_000})
    with pytest.raises(FeatoptError, match="free on cpu"):
        load_model("tiny-llama", device_map={"": "cpu"})
    disk = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
            "lm_head": "cpu"}
    assert load_model("tiny-llama", device_map=disk).dispatched  # the disk takes what the CPU cannot
    # A strategy spills to the disk, so only a --max_memory beyond what is free is refused.
    with pytest.raises(FeatoptError, match=r"--max_memory gives cpu 1GiB but only 97.7 KiB is free on cpu: lower it"):
        load_model("tiny-llama", device_map="auto", max_memory={"cpu": "1GiB"})
    assert load_model("tiny-llama", device_map="auto", max_memory={"cpu": 50_000}).dispatched


def test_the_real_smollm_estimate_is_its_weights_plus_a_little():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    weights = memory.parameter_bytes(config, torch.float32)
    assert 134e6 * 4 < weights < 136e6 * 4  # SmolLM2-135M: 134.5M parameters
    assert weights < memory.estimate(config, torch.float32) < weights + 200 * 2**20
