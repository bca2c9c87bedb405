"""Penalties on the input: checked against hand loops and the plain HF language-model loss."""

from __future__ import annotations

import math
import pickle

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from featopt.gradient.decoding import nearest_decode
from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.gradient import penalties
from featopt.gradient.module import FeatureOptimization
from featopt.runs.lightning import StepsDataModule
from featopt.objectives.objective import Context
from featopt.gradient.parametrization import FreeEmbeddings
from featopt.gradient.penalties import embedding_norm, fluency
from featopt.objectives.targets import Selection, l1_target, maximize


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


def _ids(adapter, rows=3, tokens=6, seed=0):
    return torch.randint(0, adapter.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def _ctx(adapter, embeds):
    return Context({}, embeds, torch.arange(embeds.shape[0]), adapter)


def _hf_lm_loss(adapter, ids):
    """The model's own LM loss of each row of `ids [rows, tokens]` -> `[rows]`."""
    return torch.stack([adapter.model(input_ids=row[None], labels=row[None]).loss for row in ids])


def test_embedding_norm_matches_a_loop(tiny):
    table = tiny.model.get_input_embeddings().weight.detach()
    r = sum(math.sqrt(sum(x * x for x in row.tolist())) for row in table) / table.shape[0]
    embeds = torch.randn(2, 4, tiny.d_model, generator=torch.Generator().manual_seed(1))
    for penalty, radius in ((embedding_norm(), r), (embedding_norm(0.7), 0.7)):
        got = penalty.loss(_ctx(tiny, embeds))
        for p in range(2):
            want = sum((embeds[p, t].norm().item() - radius) ** 2 for t in range(4)) / 4
            assert got[p].item() == pytest.approx(want, rel=1e-5)
    assert embedding_norm().sites == () and embedding_norm(0.7).description == "embedding_norm(r=0.7)"


def test_embedding_norm_measures_the_vocabulary_once(tiny, monkeypatch):
    calls = []
    real = penalties.mean_token_norm
    monkeypatch.setattr(penalties, "mean_token_norm", lambda e: calls.append(1) or real(e))
    penalty = embedding_norm()
    for _ in range(3):
        penalty.loss(_ctx(tiny, torch.randn(1, 2, tiny.d_model)))
    assert len(calls) == 1


def test_fluency_of_token_embeddings_is_the_models_lm_loss_and_gradient(tiny):
    ids = _ids(tiny)
    for straight_through in (False, True):
        embeds = tiny.embed(ids).detach().requires_grad_(True)
        got = fluency(straight_through=straight_through).loss(_ctx(tiny, embeds))
        got.sum().backward()
        # the decoded ids are the true ids, so the penalty is the LM loss of the text ...
        want = _hf_lm_loss(tiny, ids)
        logits = tiny.model(input_ids=ids).logits
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(got, by_hand.view(3, -1).mean(dim=1).detach())
        # ... and its gradient is the LM loss's gradient with respect to the input embeddings.
        ref = tiny.embed(ids).detach().requires_grad_(True)
        torch.stack([tiny.model(inputs_embeds=ref[p:p + 1], labels=ids[p:p + 1]).loss for p in range(3)]).sum().backward()
        torch.testing.assert_close(embeds.grad, ref.grad)


def test_fluency_of_off_manifold_embeddings_targets_their_decoded_tokens(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path))  # the pinv decoder caches its Gram inverse
    embeds = torch.randn(2, 5, tiny.d_model, generator=torch.Generator().manual_seed(2))
    table = tiny.embedding.detach()
    logits = tiny.model(inputs_embeds=embeds).logits
    by_brute_force = {
        "nearest": F.cosine_similarity(embeds[:, :, None], table[None, None], dim=-1).argmax(dim=-1),
        "pinv": (embeds @ torch.linalg.pinv(table.double()).float()).argmax(dim=-1),  # a = (E^T)^+ e
    }
    for decoder, ids in by_brute_force.items():
        want = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
        torch.testing.assert_close(fluency(decoder).loss(_ctx(tiny, embeds)), want.detach())
    # straight-through: the value is the decoded text's own LM loss
    ids = by_brute_force["nearest"]
    penalty = fluency(straight_through=True)
    assert penalty.description == "fluency(nearest, straight-through)"
    torch.testing.assert_close(penalty.loss(_ctx(tiny, embeds)), _hf_lm_loss(tiny, ids).detach())


def test_soft_fluency_is_the_expected_cross_entropy_and_one_hot_gives_the_hard_one(tiny):
    torch.manual_seed(3)
    ids = _ids(tiny, rows=2, tokens=5)
    logits_q = torch.randn(2, 5, tiny.vocab_size, requires_grad=True)
    probs = logits_q.softmax(dim=-1)
    embeds = probs @ tiny.embedding.detach()  # a simplex prior's embeddings
    got = fluency(soft=lambda rows: probs[rows]).loss(_ctx(tiny, embeds))
    logp = tiny.model(inputs_embeds=embeds).logits.log_softmax(dim=-1)
    for p in range(2):
        want = -sum((probs[p, t + 1] * logp[p, t]).sum() for t in range(4)) / 4
        assert got[p].item() == pytest.approx(want.item(), rel=1e-5)
    got.sum().backward()
    assert logits_q.grad.abs().sum() > 0  # the targets themselves are pulled too (GBDA)

    one_hot = F.one_hot(ids, tiny.vocab_size).float()
    soft = fluency(soft=lambda rows: one_hot[rows]).loss(_ctx(tiny, tiny.embed(ids)))
    torch.testing.assert_close(soft, _hf_lm_loss(tiny, ids).detach())
    assert fluency(soft=lambda rows: one_hot[rows]).description == "fluency(soft)"


def test_fluency_under_bf16_autocast_is_float32_and_close(tiny):
    ids = _ids(tiny)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fluency().loss(_ctx(tiny, tiny.embed(ids)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _hf_lm_loss(tiny, ids).detach(), rtol=0.02, atol=0.05)


def test_bad_fluency_settings_say_what_is_allowed(tiny):
    with pytest.raises(FeatoptError, match="nearest, pinv"):
        fluency("argmax")
    with pytest.raises(FeatoptError, match="at least 2 tokens"):
        fluency().loss(_ctx(tiny, torch.randn(1, 1, tiny.d_model)))
    with pytest.raises(FeatoptError, match="soft targets"):
        fluency(soft=lambda rows: torch.ones(len(rows), 3, 7)).loss(_ctx(tiny, torch.randn(2, 3, tiny.d_model)))
    with pytest.raises(FeatoptError, match="not both"):
        fluency(soft=lambda rows: rows, straight_through=True)
    with pytest.raises(FeatoptError, match="positive"):
        embedding_norm(0)


def _module(adapter, objective, selection, embeds):
    module = FeatureOptimization(FreeEmbeddings(embeds), objective, selection, adapter)
    module.trainer = None  # step_losses outside a Trainer
    return module


def _selection(adapter, tokens, spec="[:, :, 0-2]", layer=1):
    site = adapter.site("resid_post", layer)
    problems = parse_features(spec, n_tokens=tokens, width=adapter.width(site))
    return Selection(site, problems, tokens, adapter.width(site))


def test_penalties_compose_with_l1_target_as_the_weighted_sum(tiny):
    ids = _ids(tiny)
    sel = _selection(tiny, tokens=6)
    objective = l1_target(sel, 100) + 0.1 * embedding_norm(0.5) - 2 * fluency()
    assert objective.sites == (sel.site,)
    assert objective.description == f"l1_target({sel.site}, C=100) + 0.1 * embedding_norm(r=0.5) - 2 * fluency(nearest)"
    assert pickle.loads(pickle.dumps(objective)).description == objective.description  # ddp_spawn pickles it
    module = _module(tiny, objective, sel, tiny.embed(ids))
    losses, _ = module.step_losses(torch.arange(3))

    embeds = tiny.embed(ids)
    hidden = tiny.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[2]
    lm = _hf_lm_loss(tiny, ids)
    for p in range(3):
        l1 = (100 - hidden[p, :, p]).abs().sum()
        norm = ((embeds[p].norm(dim=-1) - 0.5) ** 2).mean()
        assert losses[p].item() == pytest.approx((l1 + 0.1 * norm - 2 * lm[p]).item(), rel=1e-5)


def test_a_run_whose_only_objective_reads_no_site_is_refused_or_scored(tiny):
    """FeatureOptimization reads `objective.sites`; with none, it must fail clearly (or, if it also
    reads the selection's site, score the penalty correctly): never a KeyError."""
    embeds = torch.randn(3, 4, tiny.d_model, generator=torch.Generator().manual_seed(4))
    module = _module(tiny, embedding_norm(0.5), _selection(tiny, tokens=4), embeds)
    try:
        losses, _ = module.step_losses(torch.arange(3))
    except FeatoptError as error:
        assert "site" in str(error)
    else:
        torch.testing.assert_close(losses, ((embeds.norm(dim=-1) - 0.5) ** 2).mean(dim=-1))


def _decoded_lm_loss_after_run(adapter, weight, steps=40, tokens=6):
    sel = _selection(adapter, tokens, spec="[:, :, 0-3]")
    parametrization = FreeEmbeddings.random(adapter.embedding, len(sel), tokens, seed=0)
    objective = maximize(sel) + weight * fluency() if weight else maximize(sel)
    module = FeatureOptimization(parametrization, objective, sel, adapter, lr=0.05)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=StepsDataModule(steps))
    ids = nearest_decode(adapter.embedding, parametrization.embeds.detach())
    with torch.no_grad():
        return _hf_lm_loss(adapter, ids).mean().item()


def test_a_large_fluency_weight_makes_the_decoded_text_more_fluent(tiny):
    # A random tiny model's next-token losses all lie near log(vocab) = 6.24, so the margin is
    # small; on tiny-llama it is ~0.25 nats over four problems (deterministic: same seed).
    assert _decoded_lm_loss_after_run(tiny, 10.0) < _decoded_lm_loss_after_run(tiny, 0.0) - 0.1
