"""Matching against a dense cosine matrix computed in float64 with numpy-style plain torch."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.feature_flow.match import baseline_rows, match, match_predecessors, top_matches
from featopt.feature_flow.saes import FlowSet, Node, parse_node


def rand(n, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def dense_topk(A, B, k):
    A, B = A.double(), B.double()
    cos = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T  # [na, nb], the whole matrix
    return cos.topk(k, dim=1)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_top_matches_equal_the_dense_topk(k, chunk):
    A, B = rand(37), rand(23, seed=1)
    scores, indices = top_matches(A, B, k, chunk=chunk)
    want = dense_topk(A, B, k)
    torch.testing.assert_close(scores.double(), want.values, atol=1e-6, rtol=0)
    assert torch.equal(indices, want.indices)  # random data: no ties


def test_scale_of_rows_does_not_matter_and_zero_rows_score_zero():
    A, B = rand(10), rand(12, seed=1)
    s1, i1 = top_matches(A, B, 2)
    s2, i2 = top_matches(A * 7.5, B * (torch.rand(12, 1) * 3 + 0.1), 2)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)
    assert torch.equal(i1, i2)
    A[3] = 0
    assert torch.all(top_matches(A, B, 1)[0][3] == 0)


def test_never_holds_a_target_by_candidate_matrix():
    from torch.overrides import TorchFunctionMode

    sizes = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    A, B = rand(400, d=4), rand(300, d=4, seed=1)
    with Record():
        top_matches(A, B, 2, chunk=16)
    assert sizes and max(sizes) <= 16 * 300 < 400 * 300


def test_baselines_are_seeded_and_shaped_like_the_candidate():
    B = rand(30)
    for kind in ("random", "permutation"):
        x, y = baseline_rows(B, kind, seed=3), baseline_rows(B, kind, seed=3)
        assert torch.equal(x, y) and x.shape == B.shape
        assert not torch.equal(x, baseline_rows(B, kind, seed=4))
    perm = baseline_rows(B, "permutation", seed=3)
    torch.testing.assert_close(perm.norm(dim=1), B.norm(dim=1))  # rows keep their norms
    assert torch.equal(perm.sort(dim=1).values, B.sort(dim=1).values)  # one permutation of the coordinates
    with pytest.raises(FeatoptError, match="baseline"):
        baseline_rows(B, "shuffle")


def test_match_on_a_flow_set_finds_planted_predecessors_above_the_baseline():
    from tests.feature_flow.flow_reference import make_sae

    g = torch.Generator().manual_seed(0)
    target = torch.randn(48, 64, generator=g)
    prev = torch.randn(48, 64, generator=g)
    perm = torch.randperm(48, generator=g)
    prev[perm] = target + 0.1 * torch.randn(48, 64, generator=g)  # target i's predecessor is row perm[i]
    flow = FlowSet({(1, "res"): make_sae(1, "res", W_dec=target), (0, "res"): make_sae(0, "res", W_dec=prev),
                    (1, "mlp"): make_sae(1, "mlp")})
    got = match(flow, (1, "res"), (0, "res"), k=1, baseline="permutation")
    assert torch.equal(got.indices[:, 0], perm)
    summary = got.summary(threshold=0.9)
    assert summary["above"] == 48 and summary["baseline_above"] == 0
    assert summary["mean_top1"] > 0.99 > 0.6 > summary["baseline_mean_top1"]
    both = match_predecessors(flow, (1, "res"))
    assert set(both) == {(0, "res"), (1, "mlp")}


def test_flow_set_rules(flow_set):
    assert flow_set.predecessors((2, "res")) == [(1, "res"), (2, "mlp"), (2, "att")]
    assert flow_set.predecessors((2, "mlp")) == [(1, "res")]
    assert flow_set.predecessors((0, "res")) == []
    from tests.feature_flow.flow_reference import make_sae

    transcoders = FlowSet({(layer, "mlp"): make_sae(layer, "mlp") for layer in range(3)})  # no residual SAE at all
    assert transcoders.predecessors((2, "mlp")) == [(1, "mlp")] and transcoders.predecessors((0, "mlp")) == []
    assert transcoders.successors((1, "mlp")) == [(2, "mlp")]
    assert sorted(flow_set.successors((1, "res"))) == [(2, "att"), (2, "mlp"), (2, "res")]
    assert flow_set.check_node("2/mlp/47") == Node(2, "mlp", 47)
    assert str(parse_node(" 12 / res / 4230 ")) == "12/res/4230"
    with pytest.raises(FeatoptError, match="out of range"):
        flow_set.check_node("2/mlp/48")
    with pytest.raises(FeatoptError, match="no SAE for 3/res"):
        flow_set.check_node("3/res/0")
    with pytest.raises(FeatoptError, match="malformed"):
        parse_node("2/resid/1")


def test_flow_set_refuses_mixed_widths_and_sites_the_model_lacks(llama):
    from tests.feature_flow.flow_reference import make_sae

    from featopt.models.sae.model import SAEConfig, SparseAutoencoder

    wide = SparseAutoencoder(SAEConfig(d_in=32, d_sae=8, architecture="topk", k=2, hook_name="blocks.1.resid_post"))
    with pytest.raises(FeatoptError, match="different widths"):
        FlowSet({(0, "res"): make_sae(0, "res"), (1, "res"): wide})
    with pytest.raises(FeatoptError, match="3 layers"):
        FlowSet({(5, "res"): make_sae(5, "res")}).check_model(llama)


def test_load_a_folder_of_saes(tmp_path, flow_set):
    from featopt.models.sae.formats import save_sae

    for (layer, module), sae in flow_set.saes.items():
        save_sae(sae, tmp_path / "saes" / f"{layer}-{module}")
    loaded = FlowSet.load(str(tmp_path / "saes"))
    assert loaded.keys() == flow_set.keys()
    torch.testing.assert_close(loaded[(2, "att")].W_dec, flow_set[(2, "att")].W_dec)
    two = FlowSet.load(f"{tmp_path / 'saes' / '1-res'},{tmp_path / 'saes' / '2-res'}")
    assert two.keys() == [(1, "res"), (2, "res")]
    with pytest.raises(FeatoptError, match="two SAEs for 1/res"):
        FlowSet.load([tmp_path / "saes" / "1-res", tmp_path / "saes" / "1-res"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatoptError, match="no cfg.json"):
        FlowSet.load(str(tmp_path / "empty"))
    with pytest.raises(FeatoptError, match="does not exist"):
        FlowSet.load(str(tmp_path / "nope"))
