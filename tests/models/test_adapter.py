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
    # Gemma 2/3 normalize the attention and MLP outputs before adding them to the residual.
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj"),
    "gemma3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj"),
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
        # the MLP's input: mlp.up's input everywhere (Gemma's mlp_out path is a norm, so read the up-projection)
        handles.append(get_module(block, down.rsplit(".", 1)[0]).register_forward_pre_hook(in_hook((layer, "mlp_in")), with_kwargs=True))
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
        acts = adapter.run([f"blocks.{layer}.{k}" for k in ("resid_pre", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")], input_ids=ids)
        got = {s.kind: a for s, a in acts.items()}
        torch.testing.assert_close(got["resid_pre"], hidden[layer])
        # HF's last hidden_states entry has the final norm applied; resid_post never does.
        expected_post = hidden[layer + 1] if layer < n - 1 else seen[(layer, "block_out")]
        torch.testing.assert_close(got["resid_post"], expected_post)
        for kind in ("attn_out", "mlp_in", "mlp_hidden", "mlp_out"):
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
    acts = adapter.run(["blocks.1.mlp_hidden", "blocks.1.mlp_in", "blocks.1.attn_out", "blocks.1.resid_pre"], input_ids=ids)
    mlp = model.model.layers[1].mlp
    x = model.model.layers[1].post_attention_layernorm(acts[Site(1, "resid_pre")] + acts[Site(1, "attn_out")])
    torch.testing.assert_close(acts[Site(1, "mlp_in")], x)  # after the pre-MLP norm
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
    if getattr(single.config, "layer_types", None):  # the kept block keeps its own attention kind
        single.config.layer_types = [model.config.layer_types[layer]]
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
    assert adapter.site("blocks.1.ln2.hook_normalized") == Site(1, "mlp_in") and Site(1, "mlp_in").tl_name == "blocks.1.mlp.hook_in" and adapter.site("blocks.1.mlp.hook_in") == Site(1, "mlp_in")
    assert adapter.width("blocks.0.mlp_hidden") == 128


_KINDS = ("resid_pre", "attn_out", "mlp_hidden", "mlp_out", "resid_post")


def test_embedding_rows_are_what_the_model_embeds(family_model):
    """`inputs_embeds=adapter.embedding[ids]` is the same forward as `input_ids=ids`, at every
    site, in the adapter and in a plain HF forward (Gemma scales rows inside the module)."""
    family, model = family_model
    adapter = ModelAdapter(model)
    ids = torch.randint(0, adapter.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    module = model.get_input_embeddings()
    by_hand = torch.stack([module(torch.tensor([i]))[0] for i in range(adapter.vocab_size)])
    assert torch.equal(adapter.embedding, by_hand) and adapter.embedding.dtype == model.dtype
    if family.startswith("gemma"):  # the raw weight is not the input: sqrt(d_model) apart
        torch.testing.assert_close(adapter.embedding, adapter.embedding_weight * 32 ** 0.5)
    sites = [f"blocks.{layer}.{kind}" for layer in range(adapter.n_layers) for kind in _KINDS]
    from_ids = adapter.run(sites, input_ids=ids)
    from_rows = adapter.run(sites, inputs_embeds=adapter.embedding[ids])
    for site in from_ids:
        torch.testing.assert_close(from_rows[site], from_ids[site], rtol=0, atol=1e-6)
    hf_ids = model(input_ids=ids, output_hidden_states=True).hidden_states
    hf_rows = model(inputs_embeds=adapter.embedding[ids], output_hidden_states=True).hidden_states
    for a, b in zip(hf_rows, hf_ids):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unembed_gives_the_models_logits(family_model):
    """Final norm, head and (Gemma 2) the final logit soft-cap, as the CausalLM forward applies them."""
    _, model = family_model
    adapter = ModelAdapter(model)
    ids = torch.randint(0, adapter.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    last = adapter.run([f"blocks.{adapter.n_layers - 1}.resid_post"], input_ids=ids)
    torch.testing.assert_close(adapter.unembed(next(iter(last.values()))), model(input_ids=ids).logits)


def test_cached_continuation_equals_the_full_forward_without_deprecations(family_model):
    """A prefix run once, continued per row with `cache=`: the activations of one full forward,
    and no FutureWarning (transformers 5.24 deprecates `past_key_values=`)."""
    import warnings

    from featopt.interventions.generate import generate

    _, model = family_model
    adapter = ModelAdapter(model)
    ids = torch.randint(0, adapter.vocab_size, (3, 7), generator=torch.Generator().manual_seed(6))
    sites = [f"blocks.{layer}.{kind}" for layer in range(adapter.n_layers) for kind in _KINDS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = adapter.prefix(sites, ids[:1, :4])  # one shared prefix, broadcast to every row
        ids[:, :4] = ids[0, :4]
        full = adapter.run(sites, input_ids=ids)
        cont = adapter.run(sites, input_ids=ids[:, 4:], cache=kv.broadcast(torch.zeros(3, dtype=torch.long)))
        new = generate(adapter, ids[0], 3, stop_at_eos=False)
    for site in full:
        torch.testing.assert_close(kv.acts[site], full[site][:1, :4], rtol=0, atol=1e-5)
        torch.testing.assert_close(cont[site], full[site][:, 4:], rtol=0, atol=1e-5)
    # greedy decoding by full forwards, no cache
    seq = ids[0]
    for _ in range(3):
        seq = torch.cat([seq, model(input_ids=seq[None]).logits[0, -1].argmax()[None]])
    assert new == seq[7:].tolist()


def test_with_bos_is_a_view_sharing_the_model_and_leaving_the_adapter_as_it_was():
    from featopt.models import load_model

    plain = load_model("tiny-llama")
    view = plain.with_bos(True)
    assert view.bos and not plain.bos and view.model is plain.model
    assert plain.with_bos(False) is plain and view.with_bos(True) is view
    tok = plain.tokenizer
    assert view.encode("a b").tolist() == [tok.bos_token_id, *tok("a b", add_special_tokens=False).input_ids]


def test_encode_starts_with_bos_only_when_asked():
    from featopt.models import load_model

    plain, with_bos = load_model("tiny-llama"), load_model("tiny-llama", bos=True)
    tok, text = plain.tokenizer, "Once upon a time"
    expected = tok(text, add_special_tokens=False).input_ids
    assert plain.encode(text).tolist() == expected and not plain.bos
    assert with_bos.encode(text).tolist() == [tok.bos_token_id, *expected]
    assert with_bos.encode("").tolist() == [tok.bos_token_id] and plain.encode("").tolist() == []
    assert with_bos.encode(text, bos=False).tolist() == expected  # a piece, not an input's start
    # the measured activation of [BOS] + ids is the plain HF forward's
    ids = with_bos.encode(text)[None]
    got = with_bos.run(["blocks.1.resid_post"], input_ids=ids)[Site(1, "resid_post")]
    torch.testing.assert_close(got, with_bos.model(input_ids=ids, output_hidden_states=True).hidden_states[2])
    # run(bos=True): the BOS runs first and its own position is dropped, from ids or from rows
    site = Site(1, "resid_post")
    for given in ({"input_ids": ids[:, 1:]}, {"inputs_embeds": with_bos.embedding[ids[:, 1:]]}):
        torch.testing.assert_close(with_bos.run([site], bos=True, **given)[site], got[:, 1:], rtol=0, atol=1e-6)


def test_bos_without_a_bos_token_is_one_clear_error(family_model):
    from featopt.models.tiny import tiny_tokenizer

    _, model = family_model
    tok = tiny_tokenizer()
    tok.bos_token = None
    with pytest.raises(FeatoptError, match=r"has no BOS token: drop --bos") as info:
        ModelAdapter(model, tok, bos=True)
    assert "\n" not in str(info.value)
