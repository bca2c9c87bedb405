"""Clamping a neuron, against hand-written hooks on the unmodified HF modules."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.commands.clamp import ClampConfig
from featopt.commands.clamp import clamp as run_clamp
from featopt.interventions import clamp, clamp_sweep, generate, parse_values, target_ids
from featopt.models import ModelAdapter
from featopt.models.families import get_module
from featopt.models.tiny import build_tiny

DOWN = {"gpt2": "mlp.c_proj", "gpt_neo": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "gpt_neox_serial": "mlp.dense_4h_to_h",
        "llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
        "gemma2": "mlp.down_proj", "gemma3": "mlp.down_proj"}
BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "gpt_neox_serial": "gpt_neox.layers", "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "gemma2": "model.layers", "gemma3": "model.layers"}


@pytest.fixture(scope="module")
def llama():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double().requires_grad_(False), tok, name="tiny-llama")


def _hand_clamped(model, layer: int, neuron: int, value: float):
    """A forward pre-hook on the down-projection written here: its input is the neurons' output."""
    def hook(module, args):
        x = args[0].clone()
        x[..., neuron] = value
        return (x,) + args[1:]
    return model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)


def test_clamping_each_position_to_its_own_natural_value_changes_nothing(family_model):
    """"Natural value" is per position: the neuron's own unclamped value there. A single number for
    every position would change all but one, so each position is held at its own value."""
    family, model = family_model
    adapter = ModelAdapter(model)
    ids = torch.randint(0, adapter.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        site = adapter.site("mlp_hidden", 1)
        natural = adapter.run([site], input_ids=ids)[site][..., 5]  # [2, 7]
        with clamp(adapter, 1, 5, natural):
            same = model(input_ids=ids).logits
        with clamp(adapter, 1, 5, natural[:, -1].mean() + 3.0):  # one number everywhere: a real change
            changed = model(input_ids=ids).logits
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert not torch.allclose(changed, plain)
    down = get_module(get_module(model, BLOCKS[family])[1], DOWN[family])
    assert not down._forward_pre_hooks and not down._forward_hooks


def test_the_model_is_restored_even_after_an_error(llama):
    ids = torch.tensor([[5, 9, 260, 409]])
    with torch.no_grad():
        plain = llama.model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with clamp(llama, 2, 3, 100.0):
                assert not torch.allclose(llama.model(input_ids=ids).logits, plain)
                raise RuntimeError("boom")
        torch.testing.assert_close(llama.model(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_sweep_probabilities_equal_a_hand_written_hook(llama):
    prompt, values = llama.encode("The weather today is"), parse_values("-40:40:5")
    for target in ([459], llama.encode(" sea").tolist()):  # one token; two tokens, their joint probability
        got = clamp_sweep(llama, 1, 17, prompt, target, values, batch_size=2)
        for v, p in zip(values.tolist(), got.tolist()):
            handle = _hand_clamped(llama.model, 1, 17, v)
            try:
                ids = torch.cat([prompt, torch.tensor(target[:-1], dtype=torch.long)])[None]
                with torch.no_grad():
                    probs = torch.softmax(llama.model(input_ids=ids).logits[0], -1)
            finally:
                handle.remove()
            expected = 1.0
            for j, t in enumerate(target):
                expected *= float(probs[len(prompt) - 1 + j, t])
            assert p == pytest.approx(expected, rel=1e-9)
    assert len(set(got.tolist())) > 1


def test_generation_with_a_clamped_neuron_equals_a_hand_written_greedy_loop(llama):
    prompt = llama.encode("Once upon a time")
    got = generate(llama, prompt, 6, (2, 40, 25.0), stop_at_eos=False)
    handle = _hand_clamped(llama.model, 2, 40, 25.0)
    try:
        ids = prompt[None]
        for _ in range(6):  # no cache: the whole sequence again at every step
            with torch.no_grad():
                ids = torch.cat([ids, llama.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    finally:
        handle.remove()
    assert got == ids[0, len(prompt):].tolist()
    assert got != generate(llama, prompt, 6, stop_at_eos=False)  # the clamp matters here


def test_values_notation():
    values = parse_values("-500:500:21")
    assert len(values) == 21 and values[0] == -500 and values[-1] == 500 and values[1] - values[0] == 50
    assert parse_values("0,10,145.5").tolist() == [0.0, 10.0, 145.5]
    assert parse_values(3).tolist() == [3.0]
    for bad in ("-500:500", "1:2:0", "a,b", ""):
        with pytest.raises(FeatoptError, match="start:stop:count"):
            parse_values(bad)


def test_run_clamp_writes_the_curve_and_the_plot(llama, tmp_path):
    run = run_clamp(ClampConfig(layer=1, neuron=17, prompt="The weather today is", target=" sea", values="-40:40:5",
                                generate=4, out=str(tmp_path)), llama)
    assert "2 tokens" in run.note and run.target_ids == target_ids(llama, " sea")[0] == llama.encode(" sea")[:1].tolist()
    site = llama.site("mlp_hidden", 1)
    assert run.natural == pytest.approx(float(llama.run([site], input_ids=llama.encode("The weather today is")[None])[site][0, -1, 17]))
    document = json.loads((tmp_path / "clamp.json").read_text())
    assert document["probs"] == run.probs.tolist() and document["generations"]["hold"] == 40.0
    assert (tmp_path / "clamp.png").read_bytes()[:4] == b"\x89PNG"
    text = run.table()
    assert "unclamped probability" in text and "clamped at 40" in text


def test_bad_clamps_are_featopt_errors(llama, tmp_path):
    with pytest.raises(FeatoptError, match="neuron 128 is out of range"):
        run_clamp(ClampConfig(neuron=128, out=str(tmp_path)), llama)
    with pytest.raises(FeatoptError, match="layer 3 is out of range"):
        with clamp(llama, 3, 0, 1.0):
            pass
    with pytest.raises(FeatoptError, match="does not fit"):
        with clamp(llama, 0, 0, torch.zeros(3, 5)), torch.no_grad():
            llama.model(input_ids=torch.tensor([[1, 2]]))
    with pytest.raises(FeatoptError, match="no chat template"):
        run_clamp(ClampConfig(target=None, generate=2, chat=True, out=str(tmp_path)), llama)


def test_nested_clamps_hold_several_neurons(llama):
    ids = torch.tensor([[5, 9, 260, 409]])
    site = llama.site("mlp_hidden", 1)
    with torch.no_grad(), clamp(llama, 1, 3, 7.0), clamp(llama, 1, 11, -2.0):
        acts = llama.run([site], input_ids=ids)[site]
        nested = llama.model(input_ids=ids).logits
    assert torch.all(acts[..., 3] == 7.0) and torch.all(acts[..., 11] == -2.0)
    first, second = _hand_clamped(llama.model, 1, 3, 7.0), _hand_clamped(llama.model, 1, 11, -2.0)
    try:
        with torch.no_grad():
            expected = llama.model(input_ids=ids).logits
    finally:
        first.remove()
        second.remove()
    torch.testing.assert_close(nested, expected, rtol=0, atol=0)
