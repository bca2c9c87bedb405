"""The built-in tiny models and tokenizer: deterministic, round-tripping, runnable offline."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from featopt.errors import FeatoptError
from featopt.models.tiny import EOS, TINY_MODELS, build_tiny, tiny_tokenizer

TOK = tiny_tokenizer()


def _vocab_and_merges(tok) -> str:
    """The BPE model's vocab and merges as canonical JSON: what must not change between builds."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    return json.dumps({"vocab": model["vocab"], "merges": model["merges"]}, sort_keys=True)


def test_tokenizer_is_byte_level_bpe_of_about_512_tokens():
    model = json.loads(TOK.backend_tokenizer.to_str())["model"]
    assert model["type"] == "BPE"
    assert len(TOK) == 512
    assert len(model["merges"]) >= 200  # learned merges, not just the 256 bytes
    assert TOK.eos_token == TOK.bos_token == TOK.unk_token == TOK.pad_token == EOS
    assert TOK.convert_ids_to_tokens(TOK.eos_token_id) == EOS
    # Like GPT-2: encoding adds no special tokens, and common words are single tokens.
    assert TOK("the").input_ids == TOK("the", add_special_tokens=True).input_ids
    assert len(TOK(" the").input_ids) == 1


def test_tokenizer_builds_identically_twice_and_in_another_process():
    assert _vocab_and_merges(tiny_tokenizer()) == _vocab_and_merges(TOK)
    # A fresh process has a fresh hash seed: the trainer's merges must not depend on hash order.
    code = (
        "import hashlib, json; from featopt.models.tiny import tiny_tokenizer; "
        "m = json.loads(tiny_tokenizer().backend_tokenizer.to_str())['model']; "
        "print(hashlib.sha256(json.dumps({'vocab': m['vocab'], 'merges': m['merges']}, "
        "sort_keys=True).encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(_vocab_and_merges(TOK).encode()).hexdigest()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    assume(EOS not in text)  # the special token is matched as one token, by design
    ids = TOK(text).input_ids
    assert all(0 <= i < len(TOK) for i in ids)
    assert TOK.decode(ids) == text


@pytest.mark.parametrize("text", ["", " ", "\x00\r\n\t", "héllo 世界 🎉", "  two  spaces ", "a" * 300])
def test_tokenizer_round_trips_edge_cases(text):
    assert TOK.decode(TOK(text).input_ids) == text


@pytest.mark.parametrize("name", TINY_MODELS)
def test_build_is_deterministic_and_seeded(name):
    a, _ = build_tiny(name)
    b, _ = build_tiny(name, seed=0)
    c, _ = build_tiny(name, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    emb = a.get_input_embeddings().weight
    assert not torch.equal(emb, c.get_input_embeddings().weight)


def test_build_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("tiny-gpt2")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_models_differ_from_each_other():
    embs = [build_tiny(n)[0].get_input_embeddings().weight for n in TINY_MODELS]
    assert not torch.equal(embs[0], embs[1]) and not torch.equal(embs[1], embs[2])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_shapes_and_forward(name):
    model, tok = build_tiny(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config._attn_implementation == "eager"
    texts = ["Once upon a time, a feature fired in layer two.", "def f(x): return x * 2  # 🎉 ünïcode"]
    ids = torch.tensor([tok(t).input_ids[:10] for t in texts])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        again = model(ids)
    assert out.logits.shape == (2, 10, len(tok))
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == 3 + 1 and out.hidden_states[-1].shape == (2, 10, 64)
    assert torch.equal(out.logits, again.logits)
    # Gradients reach the input embeddings: featopt optimizes inputs.
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[0, -1, 0].backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_tiny_model_accepts_its_full_context():
    model, tok = build_tiny("tiny-gpt2")
    with torch.no_grad():
        assert model(torch.zeros(1, 64, dtype=torch.long)).logits.shape == (1, 64, len(tok))


def test_unknown_tiny_name():
    with pytest.raises(FeatoptError, match="tiny-gpt2, tiny-llama, tiny-neox"):
        build_tiny("tiny-bert")
