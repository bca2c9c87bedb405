"""One objective value under every method, against brute force over the vocabulary with the plain HF
modules (hooks set up here): a composed objective over two sites, a token's log-probability and a
direction in activation space; the discrete methods reach the brute-force optimum, the gradient
methods' records score their tokens as the plain forward does, and what reads the input is refused."""

from __future__ import annotations

import pytest
import torch

import featopt
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.objectives import Selection, direction, l1_target, logprob, maximize

C, FEATURES, OTHER = 0.5, (0, 3, 8), 7  # problems read features 0, 3, 8 of block 1; the term subtracted, mlp_out[2] feature 7


@pytest.fixture(scope="module")
def tiny64():
    # float64: batched searches and the brute force then order near-equal tokens alike
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")


def _acts(model, ids):
    """Block 1's output and block 2's MLP output of `ids [N, T]` by the plain HF forward."""
    seen = {}
    hooks = [model.model.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("resid", out[0] if isinstance(out, tuple) else out)),
             model.model.layers[2].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out))]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return seen["resid"], seen["mlp"], logits


def composed():
    """l1_target(C) of features 0, 3, 8 of block 1's output minus half of feature 7 of block 2's MLP output."""
    return (l1_target(Selection("blocks.1.resid_post", "[:, :, [0, 3, 8]]"), C)
            - 0.5 * maximize(Selection("blocks.2.mlp_out", f"[:, :, {OTHER}]")))


def _brute(model, prefix: list[int]) -> torch.Tensor:
    """`[3, V]`: each problem's composed loss of every token after `prefix`, by hand: the L1 term's
    loss minus half the maximize term's loss (-activation), so the subtracted feature is pushed down."""
    vocab = torch.arange(model.config.vocab_size)
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(vocab), -1), vocab[:, None]], dim=1)
    resid, mlp, _ = _acts(model, ids)
    positions = ids.shape[1]
    return torch.stack([(C - resid[:, :, f]).abs().sum(1) + 0.5 * mlp[:, :, OTHER].sum(1) / positions for f in FEATURES])


def test_composed_objective_under_the_sweep_gcg_epo_greedy_reaches_the_brute_force_optimum(tiny64, tmp_path):
    losses = _brute(tiny64.model, [])
    best, score = losses.argmin(dim=1), -losses.min(dim=1).values
    common = dict(adapter=tiny64, progress=False, model="tiny-llama")
    sweep = featopt.search.exhaustive(composed(), top_k=3, out=str(tmp_path / "ex"), **common)
    assert [r.token_ids[0] for r in sweep.results] == best.tolist()
    torch.testing.assert_close(torch.tensor([r.extra["score"] for r in sweep.results], dtype=torch.float64), score, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor([r.extra["top_k"]["scores"][0] for r in sweep.results], dtype=torch.float64), score)
    assert "activations" not in sweep.results[0].extra["top_k"]  # scores are not activations here
    for pool in (True, False):
        found = featopt.search.gcg(composed(), tokens=1, steps=2, topk=tiny64.vocab_size, search_width=tiny64.vocab_size,
                                   allow="all", pool=pool, out=str(tmp_path / f"gcg{pool}"), **common)
        assert [r.token_ids[0] for r in found.results] == best.tolist(), pool
    # EPO and greedy over one token after a prefix: the same brute force after "The"
    prefix = tiny64.encode("The", bos=False).tolist()
    after = _brute(tiny64.model, prefix).argmin(dim=1).tolist()
    epo = featopt.search.epo(composed(), tokens=1, steps=2, topk=tiny64.vocab_size, search_width=tiny64.vocab_size,
                             allow="all", lambdas=[0.0], prefix="The", out=str(tmp_path / "epo"), **common)
    assert [r.extra["members"][0]["token_ids"][-1] for r in epo.results] == after
    greedy = featopt.search.greedy(composed(), tokens=1, prefix="The", out=str(tmp_path / "greedy"), **common)
    assert [r.token_ids[-1] for r in greedy.results] == after


def test_composed_objective_under_gradient_ascent_scores_its_tokens_as_the_plain_forward(tiny64, tmp_path):
    found = featopt.optimize(composed(), tokens=3, steps=15, lr=0.1, adapter=tiny64, progress=False, model="tiny-llama",
                             out=str(tmp_path))
    ids = torch.tensor([r.token_ids for r in found.results])
    resid, mlp, _ = _acts(tiny64.model, ids)
    expected = torch.stack([-((C - resid[p, :, f]).abs().sum() + 0.5 * mlp[p, :, OTHER].mean())
                            for p, f in enumerate(FEATURES)])
    torch.testing.assert_close(torch.tensor([r.extra["score"] for r in found.results], dtype=torch.float64), expected, rtol=1e-6, atol=1e-9)
    assert [r.spec for r in found.results] == ["[:, :, 0]", "[:, :, 3]", "[:, :, 8]"]


def test_a_token_log_probability_and_a_direction_match_the_brute_force(tiny64, tmp_path):
    token = 42
    vocab = torch.arange(tiny64.vocab_size)
    resid, _, logits = _acts(tiny64.model, vocab[:, None])
    brute_logp = torch.log_softmax(logits[:, -1], dim=-1)[:, token]
    found = featopt.search.exhaustive(logprob(token), top_k=5, adapter=tiny64, progress=False, model="tiny-llama",
                                      out=str(tmp_path / "logp"))
    assert found.results[0].token_ids[0] == int(brute_logp.argmax())
    torch.testing.assert_close(torch.tensor(found.results[0].extra["top_k"]["scores"], dtype=torch.float64),
                               brute_logp.topk(5).values, rtol=1e-9, atol=1e-12)
    vector = torch.randn(tiny64.d_model, generator=torch.Generator().manual_seed(0)).double()
    projection = resid[:, -1] @ vector
    found = featopt.search.exhaustive(direction(vector, "blocks.1.resid_post"), top_k=3, adapter=tiny64, progress=False,
                                      model="tiny-llama", out=str(tmp_path / "dir"))
    assert found.results[0].token_ids[0] == int(projection.argmax())
    assert found.results[0].activation == pytest.approx(float(projection.max()), rel=1e-9)


def test_the_fast_sweep_and_the_objective_scorer_agree(tiny64, tmp_path):
    """Plain maximize takes the sweep's threshold shortcut; the same objective as a user's subclass
    (which the sweep can only score through `loss_all`) gives the same top-k."""
    from featopt.objectives import Maximize

    class Wrapped(Maximize):  # a subclass the sweep cannot recognise as its fast case
        pass

    fast = featopt.search.exhaustive("maximize", layer=1, features="[:, :, 0-9]", top_k=4, adapter=tiny64, progress=False,
                                     model="tiny-llama", out=str(tmp_path / "fast"))
    slow_objective = Wrapped(Selection("blocks.1.resid_post", "[:, :, 0-9]"))
    from featopt.discrete import objective_scoring

    assert objective_scoring.sweep_scorers(slow_objective.bind(tiny64), tiny64, 1)[0][0] is not None  # still fast
    slow = featopt.search.exhaustive(l1_target("[:, :, 0-9]", 1e6, "blocks.1.resid_post"), top_k=4, adapter=tiny64,
                                     progress=False, model="tiny-llama", out=str(tmp_path / "slow"))
    # far below C, ||C - a||_1 falls as a rises: the generic path's top-k is the fast path's
    assert [r.extra["top_k"]["token_ids"] for r in slow.results] == [r.extra["top_k"]["token_ids"] for r in fast.results]


def test_objectives_that_read_the_input_are_refused_by_the_discrete_methods(tiny64, tmp_path):
    from featopt.gradient.penalties import embedding_norm

    objective = maximize(Selection("blocks.1.resid_post", "[:, :, 0]")) + 0.1 * embedding_norm()
    for search in (featopt.search.exhaustive, featopt.search.gcg):
        with pytest.raises(FeatoptError, match="reads the input itself"):
            search(objective, adapter=tiny64, progress=False, model="tiny-llama", out=str(tmp_path / search.__name__))
    assert not any((tmp_path / name / "results.json").exists() for name in ("exhaustive", "gcg"))


def test_the_sweep_stops_at_the_deepest_site_the_objective_reads(tiny64, tmp_path):
    ran = []
    hook = tiny64.model.model.layers[2].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        featopt.search.exhaustive("maximize", layer=1, features="[:, :, 0]", adapter=tiny64, progress=False,
                                  model="tiny-llama", out=str(tmp_path / "one"))
        assert not ran  # block 2 never ran: the objective reads block 1 only
        featopt.search.exhaustive(composed(), adapter=tiny64, progress=False, model="tiny-llama", out=str(tmp_path / "two"))
        assert ran  # the composed objective reads block 2's MLP
    finally:
        hook.remove()


def test_compare_scores_every_method_by_the_composed_objective(tiny64, tmp_path):
    """compare's optimum is the brute-force best score, and every method's token carries its own
    brute-force score (the gradient methods train on the objective itself here)."""
    losses = _brute(tiny64.model, [])
    found = featopt.compare(composed(), model="tiny-llama", steps=5, gcg_steps=2, gcg_topk=64, top_k=5,
                            methods=["embedding-pinv", "simplex-argmax", "gcg"], adapter=tiny64, progress=False,
                            out=str(tmp_path))
    for p, feature in enumerate(found.features):
        assert feature.optimum_token_id == int(losses[p].argmin())
        assert feature.optimum_activation == pytest.approx(-float(losses[p].min()), rel=1e-9)
        for method in feature.methods.values():
            assert method.activation == pytest.approx(-float(losses[p, method.token_id]), rel=1e-9, abs=1e-12)
            assert method.activation <= feature.optimum_activation + 1e-9


@pytest.mark.parametrize("prior", ["embedding", "simplex"])
def test_both_priors_record_the_composed_objectives_score_of_their_tokens(tiny64, tmp_path, prior):
    found = featopt.optimize(composed(), tokens=2, steps=8, prior=prior, adapter=tiny64, progress=False,
                             model="tiny-llama", out=str(tmp_path))
    ids = torch.tensor([r.token_ids for r in found.results])
    resid, mlp, _ = _acts(tiny64.model, ids)
    expected = [-((C - resid[p, :, f]).abs().sum() + 0.5 * mlp[p, :, OTHER].mean()) for p, f in enumerate(FEATURES)]
    assert [r.extra["score"] for r in found.results] == pytest.approx([float(e) for e in expected], rel=1e-6)


@pytest.mark.parametrize("method", ["gradient", "gcg"])
def test_inversion_under_an_objective_with_an_extra_term(tiny64, tmp_path, method):
    """`l1 + 0.1 * maximize(...)`: each text's recorded distance is the objective's loss of its
    recovered tokens, recomputed from the plain forward."""
    text = "the sea"
    found = featopt.invert(texts=[text], objective="l1 + 0.1 * maximize(features='[:, :, 3]')", method=method,
                           layer=1, steps=4, search_width=32, causal_topk=0, adapter=tiny64, progress=False,
                           model="tiny-llama", out=str(tmp_path))
    original = tiny64.encode(text, bos=False)[None]
    recovered = torch.tensor([found.results[0].token_ids])
    target, _, _ = _acts(tiny64.model, original)
    resid, _, _ = _acts(tiny64.model, recovered)
    expected = (resid - target).abs().sum() - 0.1 * resid[0, :, 3].mean()
    assert found.results[0].extra["distance"] == pytest.approx(float(expected), rel=1e-6)


def test_an_sae_latent_objective_matches_the_brute_force_encode(tiny64, tmp_path):
    """`latent(sae, ...)` reads block 1's output through the SAE (a term with its own feature map),
    and `--objective "latent(sae='DIR', ...)"` loads the same SAE from disk."""
    from featopt.models.sae import SAEConfig, SparseAutoencoder
    from featopt.models.sae.formats import save_sae
    from featopt.objectives import latent

    sae = SparseAutoencoder(SAEConfig(d_in=tiny64.d_model, d_sae=16, architecture="relu", hook_name="blocks.1.resid_post"))
    sae.init_weights(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # some latents on for most tokens
    sae = sae.double()
    vocab = torch.arange(tiny64.vocab_size)
    resid, _, _ = _acts(tiny64.model, vocab[:, None])
    with torch.no_grad():
        z = torch.relu((resid[:, -1] - sae.b_dec) @ sae.W_enc + sae.b_enc)  # [V, 16], by hand
    found = featopt.search.exhaustive(latent(sae, "[:, :, 0-3]"), top_k=2, adapter=tiny64, progress=False,
                                      model="tiny-llama", out=str(tmp_path / "value"))
    assert [r.token_ids[0] for r in found.results] == z[:, :4].argmax(dim=0).tolist()
    assert [r.activation for r in found.results] == pytest.approx(z[:, :4].max(dim=0).values.tolist(), rel=1e-9)
    assert found.results[0].feature_map["kind"] == "sae" and found.results[0].feature_map["d_sae"] == 16  # recorded
    save_sae(sae.float(), tmp_path / "sae")
    text = featopt.search.exhaustive(f"latent(sae='{tmp_path / 'sae'}', features='[:, :, 0-3]')", top_k=2,
                                     adapter=tiny64, progress=False, model="tiny-llama", out=str(tmp_path / "text"))
    assert [r.token_ids[0] for r in text.results] == [r.token_ids[0] for r in found.results]
    assert text.results[0].objective == "maximize(blocks.1.resid_post via sae)"
