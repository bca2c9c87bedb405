"""Steering during generation (featopt/feature_flow/steer.py, steer_edits.py, steer_report.py)
against hand-written generation loops: plain HF forwards without a cache, hooks registered
directly on the HF modules, and a float64 re-implementation of the topk SAE encoding."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from tests.feature_flow.flow_reference import KEYS, make_sae

from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet, parse_node
from featopt.feature_flow.steer import Setting, compare_single_multi, steer
from featopt.feature_flow.steer_edits import reference_activations, steering_edits
from featopt.feature_flow.steer_report import format_steering, plot_steering
from featopt.interventions.generate import generate

SINGLE = ["2/res/46"]
MULTI = ["1/res/31", "2/mlp/10", "2/res/46"]  # active features of three sites, two layers
PROMPTS = ["hello world", "the cat sat"]
WORDS = ["cat", "world"]
N_NEW = 6


# ---------------------------------------------------------------------------- the hand-written model
def module_of(llama, node):
    layer = llama.model.model.layers[node.layer]
    return {"res": layer, "mlp": layer.mlp, "att": layer.self_attn}[node.module]


def encode64(sae, x):
    """The topk encoding, float64: relu of the k largest of `(x - b_dec) W_enc + b_enc`."""
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    top = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))


def hooked(llama, edits=(), reads=()):
    """Forward hooks on the HF modules: `edits` = [(node, fn(x, node) -> x)], `reads` = nodes whose
    module output is stored in the returned dict `{node: [B, T, d]}`."""
    store, handles = {}, []
    for node, fn in edits:
        def hook(m, args, out, node=node, fn=fn):
            x = out[0] if isinstance(out, tuple) else out
            x = fn(x, node)
            return (x, *out[1:]) if isinstance(out, tuple) else x
        handles.append(module_of(llama, node).register_forward_hook(hook))
    for node in reads:
        def read(m, args, out, node=node):
            store[node] = (out[0] if isinstance(out, tuple) else out).detach()
        handles.append(module_of(llama, node).register_forward_hook(read))
    return store, handles


def hand_generate(llama, ids, n, edits=()):
    """Greedy, no cache: the whole sequence re-run each step; the new ids and each step's logits."""
    seq, new, steps = list(ids), [], []
    _, handles = hooked(llama, edits)
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = llama.model(input_ids=torch.tensor([seq])).logits[0, -1]
                steps.append(logits.double())
                token = int(logits.argmax())
                new.append(token)
                if token == llama.tokenizer.eos_token_id:
                    break
                seq.append(token)
    finally:
        for h in handles:
            h.remove()
    return new, steps


def scale_by_hand(flow, nodes, r):
    def fn(x, node):
        sae = flow[node.key]
        z = encode64(sae, x)[..., node.index]
        return (x.double() + (r - 1) * z[..., None] * sae.W_dec[node.index].double()).to(x.dtype)
    return [(parse_node(n), fn) for n in nodes]


def add_by_hand(flow, reference, r):
    def fn(x, node):
        return (x.double() + r * reference[node] * flow[node.key].W_dec[node.index].double()).to(x.dtype)
    return [(n, fn) for n in reference]


def theme_words_ids(llama):
    tok = llama.tokenizer
    return sorted({tok.encode(p + w, add_special_tokens=False)[0] for w in WORDS for p in (" ", "")})


@pytest.fixture(scope="module")
def result(llama, flow_set):
    settings = [Setting("multi r=3", MULTI, 3.0, "scale"), Setting("single r=0", SINGLE, 0.0, "scale")]
    return steer(flow_set, llama, PROMPTS, settings, targets=MULTI, max_new_tokens=N_NEW, theme_words=WORDS,
                 progress=False)


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("nodes", [SINGLE, MULTI])
def test_r1_scale_and_r0_add_change_nothing_bit_for_bit(llama, flow_set, nodes):
    ids = torch.tensor(llama.tokenizer.encode("hello world"))
    plain_logits, scale_logits, add_logits, moved_logits = [], [], [], []
    plain = generate(llama, ids, N_NEW, logits_out=plain_logits)
    scaled = generate(llama, ids, N_NEW, edits=steering_edits(flow_set, nodes, 1.0, mode="scale"), logits_out=scale_logits)
    reference = {parse_node(n): 7.5 for n in nodes}
    added = generate(llama, ids, N_NEW, edits=steering_edits(flow_set, nodes, 0.0, mode="add", reference=reference),
                     logits_out=add_logits)
    assert scaled == plain and added == plain
    assert len(scale_logits) == len(add_logits) == len(plain_logits) == len(plain)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain_logits, scale_logits, add_logits))
    # the edits are really installed: any other r moves the logits
    generate(llama, ids, 1, edits=steering_edits(flow_set, nodes, 1.5, mode="scale"), logits_out=moved_logits)
    assert not torch.equal(moved_logits[0], plain_logits[0])


def test_r1_setting_reproduces_the_baseline_also_when_sampling(llama, flow_set):
    settings = [Setting("one", MULTI, 1.0), Setting("zero add", MULTI, 0.0, "add")]
    res = steer(flow_set, llama, PROMPTS, settings, targets=SINGLE, max_new_tokens=N_NEW, temperature=1.5, seed=3,
                reference={parse_node(n): 2.0 for n in MULTI}, progress=False)
    for outcome in res.outcomes:
        assert [g.ids for g in outcome.generations] == [g.ids for g in res.baseline.generations]
        assert [g.theme for g in outcome.generations] == [g.theme for g in res.baseline.generations]


# ---------------------------------------------------------------------------- against hand-written loops
def test_multi_layer_steering_equals_a_hand_loop(llama, flow_set, result):
    steered = result.outcomes[0]
    assert steered.setting.name == "multi r=3"
    changed = False
    for i, text in enumerate(PROMPTS):
        ids = llama.tokenizer.encode(text)
        assert result.prompts[i] == ids
        hand, steps = hand_generate(llama, ids, N_NEW, scale_by_hand(flow_set, MULTI, 3.0))
        plain, _ = hand_generate(llama, ids, N_NEW)
        assert steered.generations[i].ids == hand
        assert result.baseline.generations[i].ids == plain
        changed |= hand != plain
        # theme-word log-prob: log of the summed softmax of the steered logits at the theme ids
        logp = torch.stack([s.log_softmax(-1) for s in steps])[:, theme_words_ids(llama)]
        assert steered.generations[i].word_logprob == pytest.approx(float(logp.exp().sum(-1).log().mean()), abs=1e-5)
    assert changed, "r = 3 on these features should change some generation"


def test_add_mode_equals_a_hand_loop(llama, flow_set):
    reference = {parse_node("1/res/7"): 4.0, parse_node("2/att/3"): 2.5}
    res = steer(flow_set, llama, ["the cat sat"], [Setting("add", list(reference), 2.0, "add")], targets=SINGLE,
                max_new_tokens=N_NEW, reference=reference, progress=False)
    hand, _ = hand_generate(llama, llama.tokenizer.encode("the cat sat"), N_NEW, add_by_hand(flow_set, reference, 2.0))
    plain, _ = hand_generate(llama, llama.tokenizer.encode("the cat sat"), N_NEW)
    assert res.outcomes[0].generations[0].ids == hand != plain


def test_theme_score_and_perplexity_equal_hand_computations(llama, flow_set, result):
    targets = [parse_node(n) for n in MULTI]
    for outcome in [result.baseline, *result.outcomes]:
        for i, gen in enumerate(outcome.generations):
            prompt = result.prompts[i]
            full = torch.tensor([prompt + gen.ids])
            store, handles = hooked(llama, reads=targets)  # clean: no edit
            try:
                with torch.no_grad():
                    logits = llama.model(input_ids=full).logits[0].double()
            finally:
                for h in handles:
                    h.remove()
            T = len(prompt)
            per_target = [float(encode64(flow_set[t.key], store[t][0])[T:, t.index].mean()) for t in targets]
            assert gen.theme == pytest.approx(sum(per_target) / len(per_target), rel=1e-5, abs=1e-6)
            nll = [-float(logits[p - 1].log_softmax(-1)[full[0, p]]) for p in range(T, full.shape[1])]
            assert gen.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
            assert gen.distinct == len(set(gen.ids)) / len(gen.ids)
        assert outcome.mean("theme") == pytest.approx(sum(g.theme for g in outcome.generations) / len(PROMPTS))
    assert result.baseline.mean("theme") > 0  # the targets are active features: the score can tell
    assert result.outcomes[0].mean("theme") != result.baseline.mean("theme")


def test_reference_activations_by_hand_and_fallback(llama, flow_set):
    silent = make_sae(2, "res")
    with torch.no_grad():
        silent.b_enc[5] = -1e3  # never among the top k
    flow = FlowSet({**{k: flow_set[k] for k in KEYS}, (2, "res"): silent})
    contexts = torch.tensor([llama.tokenizer.encode("hello world the cat")[:4], llama.tokenizer.encode("a dog sat down")[:4]])
    nodes = [parse_node(n) for n in ["1/res/31", "2/mlp/10", "2/res/5"]]
    with pytest.warns(UserWarning, match="2/res/5"):
        ref = reference_activations(flow, llama, nodes, contexts, batch_size=1)
    store, handles = hooked(llama, reads=nodes)
    try:
        with torch.no_grad():
            llama.model(input_ids=contexts)
    finally:
        for h in handles:
            h.remove()
    for node in nodes[:2]:
        expected = float(encode64(flow[node.key], store[node])[:, 1:, node.index].max())
        assert expected > 0 and ref[node] == pytest.approx(expected, rel=1e-5)
    assert ref[nodes[2]] == 1.0


# ---------------------------------------------------------------------------- records, tables, plots
def test_compare_single_multi_record_table_and_plot(llama, flow_set, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compare_single_multi(flow_set, llama, PROMPTS[:1], single=SINGLE, multi=MULTI, rs=[0.0, 2.0],
                                   max_new_tokens=3, progress=False)
    assert [o.setting.name for o in res.outcomes] == ["single r=0", "single r=2", "multi r=0", "multi r=2"]
    assert [o.setting.strategy for o in res.outcomes] == ["single"] * 2 + ["multi"] * 2
    assert [str(t) for t in res.targets] == SINGLE
    record = json.loads(json.dumps(res.record()))
    assert [s["name"] for s in record["settings"]][0] == "unsteered" and len(record["settings"]) == 5
    assert record["settings"][4]["nodes"] == MULTI and record["settings"][4]["generations"][0]["ids"]
    assert len(res.rows()) == 5 and res.rows()[0]["r"] is None
    table = format_steering(res)
    assert "multi r=2" in table and len(table.splitlines()) == 6
    path = plot_steering(res, tmp_path / "steer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- bad input
def test_bad_input(llama, flow_set):
    ok = Setting("ok", SINGLE, 2.0)
    for make in [lambda: Setting("x", SINGLE, math.inf), lambda: Setting("x", SINGLE, math.nan),
                 lambda: Setting("x", SINGLE, 1.0, "multiply"), lambda: Setting("x", [], 1.0)]:
        with pytest.raises(FeatoptError):
            make()
    bad = [
        lambda: steering_edits(flow_set, SINGLE, math.inf),
        lambda: steering_edits(flow_set, SINGLE, 1.0, mode="multiply"),
        lambda: steering_edits(flow_set, ["0/mlp/1"], 1.0),  # no SAE there
        lambda: steering_edits(flow_set, ["2/res/48"], 1.0),  # out of range
        lambda: steering_edits(flow_set, [], 1.0),
        lambda: steering_edits(flow_set, SINGLE, 1.0, mode="add"),  # no reference
        lambda: steer(flow_set, llama, [], [ok], targets=SINGLE),
        lambda: steer(flow_set, llama, [""], [ok], targets=SINGLE),
        lambda: steer(flow_set, llama, PROMPTS, [ok], targets=SINGLE, max_new_tokens=0),
        lambda: steer(flow_set, llama, PROMPTS, [ok], targets=[]),
        lambda: steer(flow_set, llama, PROMPTS, [Setting("x", ["1/mlp/99"], 2.0)], targets=SINGLE),
        lambda: steer(flow_set, llama, PROMPTS, [ok, ok], targets=SINGLE),
        lambda: compare_single_multi(flow_set, llama, PROMPTS, single=SINGLE, multi=MULTI, rs=[]),
        lambda: reference_activations(flow_set, llama, SINGLE, torch.zeros(2, 1, dtype=torch.long)),
    ]
    for call in bad:
        with pytest.raises(FeatoptError):
            call()
