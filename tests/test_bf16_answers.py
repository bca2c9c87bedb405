"""bfloat16 answers equal float32's wherever the margin allows.

The rule, for every search below: run it on the same tiny model in float32 and in bfloat16 and
measure `delta`, the largest |bf16 - fp32| difference over all the scores that search computed
(every candidate of every problem: the search is run with k = the whole candidate set). A problem
is *asserted* when its fp32 best candidate beats its runner-up by more than 2 * delta; then no
perturbation of at most delta per score can reorder the two, so the bf16 answer must be the fp32
answer, and the test asserts it. Problems within the margin are not asserted; at least half of the
problems of each search must be asserted, so a test cannot pass vacuously.

- the exhaustive sweep: the best single token of each feature (scores: every token's activation);
- greedy: each step is a sweep after the tokens chosen so far; a step is compared for the problems
  whose earlier steps agree, and its delta is measured over those problems;
- GCG, a trajectory: only its first step is compared, the candidate ranking from the one-hot gradient
  at the same (seeded) initial tokens: the best swap of every (problem, position) (the top-k sets GCG
  samples from are not: on the tiny model under half of them clear the margin, so the test would be
  vacuous);
- neuron decoding: the top token of every MLP neuron through the LM head (scores: logits).

Gradient ascent is not compared: its answer is the end of a trajectory through continuous inputs
(hundreds of Adam steps), where a bf16 rounding early on moves every later step, so no margin of
the fp32 run bounds where the bf16 run ends.
"""

from __future__ import annotations

import pytest
import torch

from featopt.discrete.candidates import CandidateModel
from featopt.discrete.exhaustive import exhaustive
from featopt.discrete.greedy import greedy
from featopt.discrete.objective_scoring import ObjectiveLoss
from featopt.models import Site, load_model
from featopt.objectives import Selection, maximize
from featopt.specs import parse_features
from featopt.weights.neurons import decode_model

SITE = Site(1, "resid_post")


@pytest.fixture(scope="module")
def models():
    return load_model("tiny-llama"), load_model("tiny-llama", dtype=torch.bfloat16)


def _objective(adapter, spec: str = "[:, :, 0-63]"):
    problems = parse_features(spec, width=adapter.width(SITE))
    return maximize(Selection(SITE, problems, over="last")).bind(adapter)


def _dense(values: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """TopK's `values [k, P]`, `ids [k, P]` over every candidate -> scores `[P, n]` by token id."""
    out = torch.full((values.shape[1], n), float("nan"), dtype=torch.float64)
    out.scatter_(1, ids.T.long().cpu(), values.T.double().cpu())
    assert not out.isnan().any(), "the search did not score every candidate"
    return out


def check(fp32: torch.Tensor, bf16: torch.Tensor, what: str, k: int = 1) -> dict:
    """The rule of the module docstring on scores `[P, C]` (higher is better): for every problem whose
    fp32 k-th best beats its (k+1)-th by more than 2 * delta, the bf16 top-k set is the fp32 top-k set
    (and for k = 1, the same best candidate). Returns the numbers, for the report."""
    fp32, bf16 = fp32.double(), bf16.double()
    delta = float((bf16 - fp32).abs().max())
    top = fp32.topk(k + 1, dim=1)
    margin = top.values[:, k - 1] - top.values[:, k]
    asserted = margin > 2 * delta
    want, got = top.indices[:, :k].sort(1).values, bf16.topk(k, dim=1).indices.sort(1).values
    wrong = asserted & (want != got).any(1)
    assert not wrong.any(), f"{what}: bf16 differs from fp32 beyond the margin at problems {wrong.nonzero()[:, 0].tolist()}"
    assert int(asserted.sum()) * 2 >= len(fp32), (f"{what}: only {int(asserted.sum())} of {len(fp32)} problems have a "
                                                  f"margin over 2 * delta = {2 * delta:.3g}")
    return {"delta": delta, "asserted": int(asserted.sum()), "problems": len(fp32),
            "agree_all": int((fp32.argmax(1) == bf16.argmax(1)).sum())}


def test_exhaustive_sweep(models):
    runs = [exhaustive(a, _objective(a), k=a.vocab_size, progress=False) for a in models]
    fp32, bf16 = (_dense(r.values, r.ids, models[0].vocab_size) for r in runs)
    check(fp32, bf16, "exhaustive")
    # The sweep's own answer (its first row) is the dense argmax, in both dtypes.
    for run, scores in zip(runs, (fp32, bf16)):
        assert torch.equal(run.ids[0].cpu().long(), scores.argmax(1))


def test_greedy(models):
    V = models[0].vocab_size
    (seq32, steps32), (seq16, steps16) = (greedy(a, _objective(a), start=torch.zeros(0, dtype=torch.long), tokens=2,
                                                 k=V, progress=False) for a in models)
    same_so_far = torch.ones(len(seq32), dtype=torch.bool)
    for step in range(2):
        rows = same_so_far.nonzero()[:, 0].tolist()
        dense = [torch.stack([_dense(torch.tensor(s[r][step]["activations"])[:, None],
                                     torch.tensor(s[r][step]["token_ids"])[:, None], V)[0] for r in rows])
                 for s in (steps32, steps16)]
        check(*dense, f"greedy step {step + 1}")
        same_so_far &= seq32[:, step] == seq16[:, step]


def test_gcg_first_step_ranking(models):
    gen = torch.Generator().manual_seed(0)
    init = torch.randint(0, models[0].vocab_size, (16, 4), generator=gen)
    grads = []
    for adapter in models:
        objective = _objective(adapter, "[:, :, 0-15]")
        model = CandidateModel(adapter, [SITE], ObjectiveLoss(objective, adapter), torch.zeros(0, dtype=torch.long))
        grads.append(model.gradient(init, torch.arange(16)))  # [P, N, V]; GCG ranks swaps by -gradient
    fp32, bf16 = (-g.reshape(-1, g.shape[-1]) for g in grads)  # one problem per (row, position)
    check(fp32, bf16, "GCG best swap")


def test_neuron_decode_top_token(models):
    decoded = [decode_model(a, [0, 1, 2], k=a.vocab_size, progress=False) for a in models]
    V = models[0].vocab_size
    for layer in (0, 1, 2):
        fp32, bf16 = (torch.log(_dense(d[layer].probs.T, d[layer].ids.T, V)) for d in decoded)
        check(fp32, bf16, f"neuron decode, layer {layer}")
        assert torch.equal(decoded[0][layer].ids[:, 0], fp32.argmax(1))
