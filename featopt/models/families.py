"""Where each architecture keeps its parts: a small table of module paths per family.

The adapter never re-implements a model; it only needs to know which unmodified Hugging Face
module holds the blocks, the attention, the MLP and its projections. Unknown model types fall
back to a search of the module tree by the common names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from featopt.errors import FeatoptError


@dataclass(frozen=True)
class Family:
    """Module paths, relative to the base model (`blocks`, `final_norm`) or to a block (the rest)."""

    name: str
    blocks: str
    final_norm: str
    attn: str
    mlp: str
    mlp_down: str  # its input is the MLP's hidden neurons (site `mlp_hidden`)
    mlp_up: str
    mlp_gate: str | None = None
    # Where `attn_out`/`mlp_out` are read when the block normalizes a module's output before adding
    # it to the residual (Gemma 2/3's post-norms): the norm, so resid_pre + attn_out is the sum.
    attn_out: str | None = None
    mlp_out: str | None = None


_LLAMA = Family("llama", "layers", "norm", "self_attn", "mlp", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")

FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "h", "ln_f", "attn", "mlp", "mlp.c_proj", "mlp.c_fc"),
    "gpt_neo": Family("gpt_neo", "h", "ln_f", "attn", "mlp", "mlp.c_proj", "mlp.c_fc"),
    "gpt_neox": Family("gpt_neox", "layers", "final_layer_norm", "attention", "mlp", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    # Llama-like decoders share Llama's module names.
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "olmo", "granite")},
    # Gemma 2/3: Llama's names, but `post_attention_layernorm` normalizes the attention output
    # (Llama's is the MLP's input norm) and `post_feedforward_layernorm` the MLP output.
    **{t: Family(t, "layers", "norm", "self_attn", "mlp", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj",
                 attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
       for t in ("gemma2", "gemma3_text")},
}

_GENERIC_NAMES = {
    "blocks": ("layers", "h", "blocks", "decoder.layers"),
    "final_norm": ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"),
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
    "mlp_down": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out", "feed_forward.w2"),
    "mlp_up": ("mlp.up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc1", "mlp.fc_in", "feed_forward.w1"),
}


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """`get_module(block, "mlp.down_proj")`, or None when any part is missing."""
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_family(model_type: str, base: nn.Module) -> Family:
    """The family for a HF `config.model_type`, or one found by searching common names."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]

    def first(root: nn.Module, key: str) -> str:
        for path in _GENERIC_NAMES[key]:
            if get_module(root, path) is not None:
                return path
        raise FeatoptError(
            f"model type {model_type!r} is not supported: no {key} module found by the usual names; "
            f"supported families are {', '.join(sorted(FAMILIES))}."
        )

    blocks_path = first(base, "blocks")
    block = get_module(base, blocks_path)[0]
    gate = "mlp.gate_proj" if get_module(block, "mlp.gate_proj") is not None else None
    return Family(
        model_type, blocks_path, first(base, "final_norm"), first(block, "attn"), first(block, "mlp"),
        first(block, "mlp_down"), first(block, "mlp_up"), gate,
    )
