"""Output-matching inversion on a tiny model: padding, targets, gradients and recovery counts
checked against the plain HF forward and plain Python counting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.commands.invert import InversionConfig, build
from featopt.commands.invert import invert as run

TEXTS = ["the sea", "Once upon a time there was", "a small town by"]  # 4, 8 and 4 tiny tokens


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


def _config(tmp_path, **kw):
    base = dict(model="tiny-llama", layer=0, texts=TEXTS, steps=20, lr=0.05, objective="cosine",
                out=str(tmp_path / "run"), progress=False, decode_every=10)
    return InversionConfig(**{**base, **kw})


def _hidden(adapter, layer, ids=None, embeds=None):
    return adapter.model(input_ids=ids, inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer + 1]


def test_texts_are_padded_and_targets_are_each_text_alone(tiny, tmp_path):
    module, batch, _ = build(_config(tmp_path, layer=1), tiny)
    pad = tiny.tokenizer.eos_token_id if tiny.tokenizer.pad_token_id is None else tiny.tokenizer.pad_token_id
    for p, text in enumerate(TEXTS):
        ids = tiny.tokenizer.encode(text, add_special_tokens=False)
        n = len(ids)
        assert batch.ids[p, :n].tolist() == ids and set(batch.ids[p, n:].tolist()) <= {pad}
        assert batch.mask[p].tolist() == [t < n for t in range(batch.ids.shape[1])]
        with torch.no_grad():  # each text run alone, unpadded: padding must not change its outputs
            alone = _hidden(tiny, 1, ids=torch.tensor([ids]))[0]
        torch.testing.assert_close(module.objective.target[p, :n], alone, atol=1e-5, rtol=1e-5)
    assert module.objective.description == "match_cosine(blocks.1.resid_post)"


def test_loss_and_gradient_match_a_plain_hf_computation(tiny, tmp_path):
    module, batch, _ = build(_config(tmp_path, layer=1, objective="l1"), tiny)
    module.trainer = None
    rows = torch.arange(3)
    losses, _ = module.step_losses(rows)
    module.zero_grad()
    losses.sum().backward()
    got = module.parametrization.embeds.grad.clone()

    embeds = module.parametrization.embeds.detach().clone().requires_grad_(True)
    out = _hidden(tiny, 1, embeds=embeds)
    with torch.no_grad():
        real = [_hidden(tiny, 1, ids=tiny.encode(t)[None])[0] for t in TEXTS]
    want = sum((out[p, :len(r)] - r).abs().sum() for p, r in enumerate(real))
    want.backward()
    torch.testing.assert_close(losses.sum(), want.detach())
    torch.testing.assert_close(got, embeds.grad)
    assert got[~batch.mask].abs().max() == 0  # padded positions are never pulled anywhere


def test_inversion_recovers_the_texts_and_counts_them_right(tiny, tmp_path):
    result = run(_config(tmp_path), tiny)
    correct = total = exact = 0
    for r, text in zip(result.results, TEXTS):
        original = tiny.tokenizer.encode(text, add_special_tokens=False)
        hits = sum(a == b for a, b in zip(r.token_ids, original))
        assert len(r.token_ids) == len(original) and r.spec == text and r.extra["original_token_ids"] == original
        assert r.extra["token_recovery"] == pytest.approx(hits / len(original))
        assert r.extra["exact_match"] == (hits == len(original)) and r.text == tiny.tokenizer.decode(r.token_ids)
        correct, total, exact = correct + hits, total + len(original), exact + (hits == len(original))
        with torch.no_grad():  # the recorded distance is the recovered tokens' own, re-measured here
            got, want = (_hidden(tiny, 0, ids=torch.tensor([ids]))[0] for ids in (r.token_ids, original))
        assert r.extra["distance"] == pytest.approx(1 - F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item(), abs=1e-5)
    assert result.metrics["token_recovery"] == pytest.approx(correct / total)
    assert result.metrics["exact_match"] == pytest.approx(exact / len(TEXTS))
    assert correct / total >= 0.9  # layer 0 of a random model: the output pins the input down

    document = json.loads((result.out / "results.json").read_text())
    assert document["run"]["metrics"]["token_recovery"] == result.metrics["token_recovery"]
    assert [r["spec"] for r in document["results"]] == TEXTS
    from safetensors.torch import load_file

    tensors = load_file(result.out / "embeddings.safetensors")
    assert tensors["token_ids"].shape == tensors["mask"].shape == (3, 8)
    assert tensors["embeddings"].shape == (3, 8, tiny.d_model)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.out / "tensorboard")).Reload()
    # By step: the accumulator returns events in file order, and a run can leave more than one file.
    logged = sorted(events.Scalars("inversion/token_recovery"), key=lambda e: e.step)
    assert [e.step for e in logged] == [10, 20] and logged[-1].value == pytest.approx(correct / total)


@pytest.mark.parametrize("change, words", [
    (dict(texts=["fine", ""]), "text 2 is empty"),
    (dict(texts=None), "no text to invert"),
    (dict(objective="l2"), "allowed are l1, cosine"),
    (dict(prior="gaussian"), "allowed are embedding, simplex"),
    (dict(decoder="argmax"), "allowed are pinv, nearest"),
    (dict(steps=0), "--steps must be at least 1"),
    (dict(prior="simplex", temperature_end=0.0), "--temperature_end must be positive"),
])
def test_bad_input_says_what_is_allowed_and_writes_nothing(tiny, tmp_path, change, words):
    with pytest.raises(FeatoptError, match=words):
        run(_config(tmp_path, **change), tiny)
    assert not (tmp_path / "run" / "results.json").exists()


def test_the_simplex_prior_answers_with_its_own_argmax(tiny, tmp_path):
    pytest.importorskip("featopt.gradient.simplex")
    result = run(_config(tmp_path, prior="simplex", steps=5, lr=0.5, texts=TEXTS[:2]), tiny)
    argmax = result.module.parametrization.logits.argmax(dim=-1)
    for p, r in enumerate(result.results):
        assert r.token_ids == argmax[p, :len(r.token_ids)].tolist() and r.extra["decoded_by"] == "simplex-argmax"


def test_two_processes_give_the_results_of_one(tiny, tmp_path):
    """3 texts over 2 ranks (2 + 1 rows): each rank must compare its rows with their own targets."""
    one = run(_config(tmp_path / "one", steps=8), tiny)
    two = run(_config(tmp_path / "two", steps=8, devices=2, strategy="ddp_spawn", accelerator="cpu"), tiny)
    assert two.trainer.world_size == 2
    torch.testing.assert_close(two.module.parametrization.embeds, one.module.parametrization.embeds, rtol=1e-5, atol=1e-5)
    assert [r.token_ids for r in two.results] == [r.token_ids for r in one.results]
    assert two.metrics["distance"] == pytest.approx(one.metrics["distance"], abs=1e-5)
