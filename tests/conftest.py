"""Shared test setup: offline always, tiny models of every supported family built in code."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
import torch

# Never reach for a model hub from a test: a missing file must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NetworkUsed(RuntimeError):
    """A test opened a connection beyond this machine."""


def _loopback(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost: resolving and reaching it is network use


def _guard(connect):
    def guarded(self, address):
        # Loopback stays open: torch.distributed's store (ddp_spawn tests) listens on 127.0.0.1.
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise NetworkUsed(f"a test tried to connect to {address!r}: tests run offline, with local files only.")
        return connect(self, address)
    return guarded


# The socket guard: any connection from the test process to another machine fails the test
# (subprocesses are covered by HF_HUB_OFFLINE above, not by this guard).
socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)


def _family_models():
    from transformers import (
        GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM,
        Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
        MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    common = dict(vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    llama_like = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, **common)
    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=32, **common)),
        "gpt_neo": lambda: GPTNeoForCausalLM(GPTNeoConfig(
            num_layers=3, hidden_size=32, num_heads=4, max_position_embeddings=32,
            attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=4, **common)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, **common)),
        "gpt_neox_serial": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, use_parallel_residual=False, **common)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**llama_like)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**llama_like)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**llama_like)),
        # Gemma scales embedding rows by sqrt(d_model) inside the embedding module and normalizes
        # each module's output before the residual add; a window of 4 tokens on the sliding
        # layers makes the tests' 5-6 token inputs reach past it.
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
            head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **llama_like)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
            head_dim=8, sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **llama_like)),
    }


FAMILIES = sorted(_family_models())


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """A random-init 3-layer model of each supported family, eval mode, frozen."""
    torch.manual_seed(0)
    model = _family_models()[request.param]().eval()
    model.requires_grad_(False)
    return request.param, model
