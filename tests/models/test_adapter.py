"""The adapter's activations must equal what the unmodified HF model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.models.families import get_module

# Independent of the adapter's table: where each family keeps its parts, written out by hand.
PATHS = {
    "gpt2": ("transformer.h", "attn", "mlp", "mlp.c_proj"),
    "gpt_neo": ("transformer.h", "attn", "mlp", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h"),
    "gpt_neox_serial": ("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h"),
    "llama": ("model.layers", "self_attn", "mlp", "mlp.down_proj"),
    "mistral": ("model.layers", "self_attn", "mlp", "mlp.down_proj"),
    "qwen2": ("model.layers", "self_attn", "mlp", "mlp.down_proj"),
}


def _reference(model, family, ids):
    """Every site of every block from ONE plain HF forward, read with hooks set up here."""
    blocks_path, attn, mlp, down = PATHS[family]
    blocks = get_module(model, blocks_path)
    seen, handles = {}, []

    def out_hook(key):
        return lambda m, a, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

    def in_hook(key):
        return lambda m, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])

    for layer, block in enumerate(blocks):
        handles.append(get_module(block, attn).register_forward_hook(out_hook((layer, "attn_out"))))
        handles.append(get_module(block, mlp).register_forward_hook(out_hook((layer, "mlp_out"))))
        handles.append(get_module(block, down).register_forward_pre_hook(in_hook((layer, "mlp_hidden")), with_kwargs=True))
        handles.append(block.register_forward_hook(out_hook((layer, "block_out"))))
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states, seen


def test_every_site_equals_the_hf_forward(family_model):
    family, model = family_model
    adapter = ModelAdapter(model)
    ids = torch.randint(0, adapter.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    hidden, seen = _reference(model, family, ids)
    n = adapter.n_layers
    for layer in range(n):
        acts = adapter.run([f"blocks.{layer}.{k}" for k in ("resid_pre", "attn_out", "mlp_hidden", "mlp_out", "resid_post")], input_ids=ids)
        got = {s.kind: a for s, a in acts.items()}
        torch.testing.assert_close(got["resid_pre"], hidden[layer])
        # HF's last hidden_states entry has the final norm applied; resid_post never does.
        expected_post = hidden[layer + 1] if layer < n - 1 else seen[(layer, "block_out")]
        torch.testing.assert_close(got["resid_post"], expected_post)
        for kind in ("attn_out", "mlp_hidden", "mlp_out"):
            torch.testing.assert_close(got[kind], seen[(layer, kind)])
    # the final norm the adapter found is the one HF applies after the last block
    torch.testing.assert_close(adapter.final_norm(seen[(n - 1, "block_out")]), hidden[n])


def test_mlp_hidden_is_the_activation_of_the_up_projection():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).eval()
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 50, (1, 5))
    acts = adapter.run(["blocks.1.mlp_hidden", "blocks.1.attn_out", "blocks.1.resid_pre"], input_ids=ids)
    mlp = model.model.layers[1].mlp
    x = model.model.layers[1].post_attention_layernorm(acts[Site(1, "resid_pre")] + acts[Site(1, "attn_out")])
    manual = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(acts[Site(1, "mlp_hidden")], manual)


def test_forward_stops_at_the_site(family_model):
    family, model = family_model
    adapter = ModelAdapter(model)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(adapter.blocks)]
    try:
        adapter.forward_to_site(adapter.embed(torch.zeros(1, 3, dtype=torch.long)), "blocks.0.mlp_out")
    finally:
        for h in handles:
            h.remove()
    assert calls == []  # block 0 itself stops inside, after its MLP, before returning
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in adapter.blocks)


def test_isolated_block_equals_a_one_block_model(family_model):
    """Block l alone on the embeddings = a copy of the model with only block l kept."""
    family, model = family_model
    adapter = ModelAdapter(model)
    layer = 2
    ids = torch.randint(0, adapter.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    got = adapter.run_block(layer, adapter.embed(ids))

    single = copy.deepcopy(model)
    blocks_path = PATHS[family][0]
    parent, attr = blocks_path.rsplit(".", 1)
    kept = get_module(single, blocks_path)[layer]
    setattr(get_module(single, parent), attr, torch.nn.ModuleList([kept]))
    single.config.num_hidden_layers = 1
    seen = {}
    kept.register_forward_hook(lambda m, a, out: seen.setdefault("out", out[0] if isinstance(out, tuple) else out))
    single(input_ids=ids, use_cache=False)
    torch.testing.assert_close(got, seen["out"])
    # and the model is restored: the full forward still matches HF
    torch.testing.assert_close(adapter.run(["blocks.0.resid_post"], input_ids=ids)[Site(0, "resid_post")],
                               model(input_ids=ids, output_hidden_states=True).hidden_states[1])


def test_gradients_reach_the_input_embeddings(family_model):
    _, model = family_model
    adapter = ModelAdapter(model)
    embeds = adapter.embed(torch.zeros(1, 4, dtype=torch.long)).detach().requires_grad_(True)
    adapter.forward_to_site(embeds, "blocks.1.resid_post", isolated=True)[0, -1, 3].backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_write_hook_changes_downstream_and_is_removed():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).eval()
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 50, (1, 4))
    before = adapter.logits(ids)

    def zero_neuron(act, site):
        act = act.clone()
        act[..., 5] = 0.0
        return act

    with adapter.hooks(read=["blocks.0.mlp_hidden"], write={"blocks.0.mlp_hidden": zero_neuron}) as acts:
        clamped = adapter.logits(ids)
    assert torch.all(acts[Site(0, "mlp_hidden")][..., 5] == 0)
    # independent: the same edit done by hand on the HF module
    handle = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: (zero_neuron(a[0], None),))
    by_hand = model(ids).logits
    handle.remove()
    torch.testing.assert_close(clamped, by_hand)
    assert not torch.allclose(clamped, before)
    torch.testing.assert_close(adapter.logits(ids), before)


def test_hooks_are_removed_after_an_exception():
    from transformers import GPT2Config, GPT2LMHeadModel

    adapter = ModelAdapter(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval())
    with pytest.raises(RuntimeError):
        with adapter.hooks(read=["blocks.1.resid_post"]):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in adapter.model.modules())


def test_bad_sites_say_what_is_allowed():
    from transformers import GPT2Config, GPT2LMHeadModel

    adapter = ModelAdapter(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval())
    with pytest.raises(FeatoptError, match="2 layers"):
        adapter.site("resid_post", 7)
    with pytest.raises(FeatoptError, match="allowed kinds"):
        adapter.site("resid_middle", 0)
    assert adapter.site("blocks.1.hook_mlp_out") == Site(1, "mlp_out")
    assert adapter.site("blocks.0.mlp.hook_post") == Site(0, "mlp_hidden")
    assert adapter.width("blocks.0.mlp_hidden") == 128
