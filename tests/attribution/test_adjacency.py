"""The replacement model and attribution graph on tiny-llama with three random transcoders (one with
a skip connection), against independent computations: the plain Hugging Face forward, the
linearised model's Jacobian by `torch.autograd.functional.jacobian`, and finite differences (the
linear model's change when one source is removed)."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.attribution.adjacency import attribute, logit_targets
from featopt.attribution.replacement import ReplacementModel
from featopt.models import load_model
from tests.attribution.tiny_graph import D_SAE, transcoder as _transcoder

def test_the_replacement_model_with_its_errors_is_the_plain_forward(setup):
    adapter, model, ids, prompt = setup
    plain = adapter.model(input_ids=ids[None]).logits[0]
    with torch.no_grad():
        replaced = model.linear(prompt, 2).logits
    for row in replaced:
        torch.testing.assert_close(row, plain, rtol=1e-4, atol=1e-4)
    assert model.check(prompt) < 1e-5
    assert all(float(e.abs().max()) > 1e-2 for e in prompt.errors)  # random transcoders: errors of their size


def _target_values(model, prompt, graph, sources):
    """Every target node's value in the linear model fed `sources`: features' pre-activations (less
    their bias) and the logits' demeaned directions, `[n_features + n_logits]`."""
    run = model.linear(prompt, 1, sources)
    values = [run.mlp_in[layer][0, pos] @ model.transcoders[layer].W_enc[:, latent] for layer, pos, latent in graph.features.tolist()]
    W_U = model.adapter.lm_head.weight
    values += [run.final[0, -1] @ (W_U[t] - W_U.mean(0)) for t in graph.logit_ids.tolist()]
    return torch.stack(values)


def _sources(prompt):
    return {"embeds": prompt.embeds[None].clone(), "acts": [a[None].clone() for a in prompt.acts],
            "errors": [e[None].clone() for e in prompt.errors]}


def test_the_linearised_model_is_linear_in_its_sources_and_the_real_one_is_not(setup):
    adapter, model, ids, prompt = setup
    gen = torch.Generator().manual_seed(0)
    base = _sources(prompt)
    step = {"embeds": torch.randn(base["embeds"].shape, generator=gen),
            "acts": [torch.randn(a.shape, generator=gen) for a in base["acts"]],
            "errors": [torch.randn(e.shape, generator=gen) for e in base["errors"]]}

    def at(t):
        return {"embeds": base["embeds"] + t * step["embeds"],
                "acts": [a + t * s for a, s in zip(base["acts"], step["acts"])],
                "errors": [e + t * s for e, s in zip(base["errors"], step["errors"])]}

    with torch.no_grad():
        f = [model.linear(prompt, 1, at(t)).logits for t in (0.0, 1.0, 2.0)]
        real = [adapter.model(inputs_embeds=at(t)["embeds"]).logits for t in (0.0, 1.0, 2.0)]
    first, second = f[1] - f[0], f[2] - 2 * f[1] + f[0]
    assert float(second.abs().max()) < 1e-4 * float(first.abs().max())
    assert float((real[2] - 2 * real[1] + real[0]).abs().max()) > 1e-2 * float((real[1] - real[0]).abs().max())


def test_every_edge_is_the_linear_models_jacobian_times_the_source(setup, graph):
    _, model, ids, prompt = setup
    base = _sources(prompt)
    n_layers, T = len(prompt.acts), len(ids)
    shapes = [base["embeds"].shape] + [a.shape for a in base["acts"]] + [e.shape for e in base["errors"]]
    sizes = [int(torch.tensor(s).prod()) for s in shapes]

    def flat_to_targets(flat):
        parts = list(torch.split(flat, sizes))
        parts = [p.reshape(s) for p, s in zip(parts, shapes)]
        sources = {"embeds": parts[0], "acts": parts[1:1 + n_layers], "errors": parts[1 + n_layers:]}
        return _target_values(model, prompt, graph, sources)

    flat = torch.cat([t.reshape(-1) for t in [base["embeds"], *base["acts"], *base["errors"]]])
    J = torch.autograd.functional.jacobian(flat_to_targets, flat)  # [targets, source dims]
    blocks = list(torch.split(J, sizes, dim=1))
    r = graph.node_ranges()
    rows = list(range(*r["features"])) + list(range(*r["logits"]))
    want = torch.zeros(len(rows), graph.adjacency.shape[1])
    for i, (layer, pos, latent) in enumerate(graph.features.tolist()):
        want[:, i] = blocks[1 + layer].reshape(len(rows), T, D_SAE)[:, pos, latent] * prompt.acts[layer][pos, latent]
    for layer in range(n_layers):
        err = blocks[1 + n_layers + layer].reshape(len(rows), T, -1)
        want[:, r["errors"][0] + layer * T:r["errors"][0] + (layer + 1) * T] = (err * prompt.errors[layer]).sum(-1)
    want[:, r["tokens"][0]:r["tokens"][1]] = (blocks[0].reshape(len(rows), T, -1) * prompt.embeds).sum(-1)
    got = graph.adjacency[rows]
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    assert int((got.abs() > 1e-3 * scale).sum()) > len(rows)  # the graph is not empty
    assert torch.all(graph.adjacency[r["errors"][0]:r["tokens"][1]] == 0)  # errors and tokens have no inputs


def test_an_edge_is_what_removing_its_source_changes_in_the_linear_model(setup, graph):
    """A finite difference of step 'the whole source': the linear model's target values with one
    source set to zero, against all sources."""
    _, model, ids, prompt = setup
    base = _sources(prompt)
    T = len(ids)
    r = graph.node_ranges()
    with torch.no_grad():
        full = _target_values(model, prompt, graph, base)
        strongest = graph.adjacency[r["logits"][0], :r["features"][1]].abs().argmax()
        layer, pos, latent = graph.features[strongest].tolist()
        cases = [(int(strongest), "acts", layer, (0, pos, latent)),
                 (r["errors"][0] + 1 * T + 2, "errors", 1, (0, 2)), (r["tokens"][0] + 3, "embeds", None, (0, 3))]
        for column, kind, layer, where in cases:
            sources = {"embeds": base["embeds"].clone(), "acts": [a.clone() for a in base["acts"]],
                       "errors": [e.clone() for e in base["errors"]]}
            tensor = sources[kind] if layer is None else sources[kind][layer]
            tensor[where] = 0
            change = full - _target_values(model, prompt, graph, sources)
            rows = list(range(*r["features"])) + list(range(*r["logits"]))
            torch.testing.assert_close(graph.adjacency[rows, column], change, rtol=1e-3, atol=1e-4 * float(change.abs().max()))


def test_logit_targets_follow_the_probability_rule_or_the_ids_given(setup):
    _, _, _, prompt = setup
    probs = torch.softmax(prompt.logits[-1], dim=-1)
    ids, p = logit_targets(prompt, max_logits=10, desired_prob=0.95)
    order = probs.argsort(descending=True)
    assert torch.equal(ids, order[:len(ids)]) and len(ids) <= 10
    assert len(ids) == 10 or float(p.sum()) >= 0.95 > float(p[:-1].sum())
    ids, p = logit_targets(prompt, logit_ids=torch.tensor([5, 7]))
    assert ids.tolist() == [5, 7] and torch.equal(p, probs[[5, 7]])
    with pytest.raises(FeatoptError, match="token ids in 0..511"):
        logit_targets(prompt, logit_ids=torch.tensor([100_000]))


def test_transcoder_sets_that_do_not_fit_are_refused_in_one_sentence(setup):
    adapter = setup[0]
    with pytest.raises(FeatoptError, match="missing layer 2"):
        ReplacementModel(adapter, [_transcoder(0, 0), _transcoder(1, 1)])
    with pytest.raises(FeatoptError, match="width 64: transcoders for another model"):
        ReplacementModel(adapter, [_transcoder(layer, layer, d=32) for layer in range(3)])
    with pytest.raises(FeatoptError, match="from blocks.L.mlp_in to blocks.L.mlp_out"):
        ReplacementModel(adapter, [_transcoder(layer, layer, kind="resid_pre") for layer in range(3)])
    with pytest.raises(FeatoptError, match="two transcoders for layer 1"):
        ReplacementModel(adapter, [_transcoder(0, 0), _transcoder(1, 1), _transcoder(1, 2)])
    with pytest.raises(FeatoptError, match="Llama-like model"):
        ReplacementModel(load_model("tiny-gpt2"), [_transcoder(layer, layer) for layer in range(3)])


def test_a_model_in_sdpa_attention_is_captured_in_eager_and_left_as_it_was():
    adapter = load_model("tiny-llama")
    adapter.model.set_attn_implementation("sdpa")
    model = ReplacementModel(adapter, [_transcoder(layer, layer) for layer in range(3)])
    ids = adapter.tokenizer("A small town by the sea", return_tensors="pt").input_ids[0]
    prompt = model.capture(ids)
    assert adapter.model.config._attn_implementation == "sdpa"
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p in prompt.frozen.patterns)  # rows of a softmax
    assert model.check(prompt) < 1e-5


def test_skipped_first_positions_have_no_nodes_and_leave_every_other_edge_as_it_was(setup, graph):
    adapter, model, ids, _ = setup
    skipping = ReplacementModel(adapter, model.transcoders, skip_first=1)
    prompt = skipping.capture(ids)
    assert skipping.check(prompt) < 1e-5  # the error at position 0 holds the whole MLP output
    skipped = attribute(skipping, ids, batch_size=16)
    assert int((skipped.features[:, 1] == 0).sum()) == 0 and int((graph.features[:, 1] == 0).sum()) > 0
    T, n_layers = len(ids), adapter.n_layers
    e0 = skipped.node_ranges()["errors"][0]
    assert float(skipped.adjacency[:, [e0 + layer * T for layer in range(n_layers)]].abs().max()) == 0
    # The linear model's Jacobian does not depend on the sources' values: every edge between nodes
    # both graphs have is the same.
    keep = torch.nonzero(graph.features[:, 1] > 0).flatten()
    old = torch.cat([keep, torch.arange(len(graph.features), len(graph.adjacency))])
    new = torch.arange(len(skipped.adjacency))
    inner = torch.ones(len(new), dtype=torch.bool)
    inner[[e0 + layer * T for layer in range(n_layers)]] = False  # position 0's errors: now constants
    torch.testing.assert_close(skipped.adjacency[new][:, new[inner]], graph.adjacency[old][:, old[inner]],
                               rtol=1e-4, atol=1e-5 * float(graph.adjacency.abs().max()))
