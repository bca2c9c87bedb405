"""`featopt align` against top-k sets from a plain loop over the vocabulary with plain HF forwards."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from search_reference import resid_post

from featopt.cli import main
from featopt.errors import FeatoptError
from featopt.commands import align as align_command
from featopt.discrete import align
from featopt.commands.align import AlignConfig
from featopt.commands.align import align as run

K = 5


def _top(scores: torch.Tensor, k: int = K) -> set[int]:
    """The k best token ids of `scores [vocab]` by plain sorting."""
    return {t for _, t in sorted((-float(v), t) for t, v in enumerate(scores))[:k]}


def _sets(acts: torch.Tensor) -> list[set[int]]:
    """`acts [vocab, d_model]` -> each feature's top-k token set."""
    return [_top(acts[:, f]) for f in range(acts.shape[1])]


@pytest.fixture(scope="module")
def brute(tiny64):
    """Per layer of the tiny Llama, each feature's top-K set over every one-token input: every
    token is its own sequence (a row of one plain forward; rows never interact). Layers 0 and 1
    come from `hidden_states` (entry l + 1 is block l's output); its last entry is after the final
    norm, so layer 2 is read by a hook on the block instead. On a copy of the model: asking for
    `hidden_states` leaves transformers' capture hooks on the modules, which cannot be pickled, and
    the session's model is later sent to spawned processes."""
    ids = torch.arange(tiny64.vocab_size)[:, None]
    model = copy.deepcopy(tiny64.model)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        acts = {0: hidden[1][:, 0], 1: hidden[2][:, 0], 2: resid_post(model, ids, 2)[:, 0]}
    return {layer: _sets(a) for layer, a in acts.items()}


def _expected(sets_by_entry: list[list[set[int]]], perm=None) -> torch.Tensor:
    n = len(sets_by_entry)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i, a in enumerate(sets_by_entry):
        for j, b in enumerate(sets_by_entry):
            pairs = zip(a, b if perm is None else [b[p] for p in perm])
            out[i, j] = sum(len(x & y) / K for x, y in pairs) / len(a)
    return out


def _config(tmp_path, **kw):
    return AlignConfig(**{**dict(model="tiny-llama", top_k=K, out=str(tmp_path / "align"), progress=False), **kw})


def test_overlap_and_baseline_match_brute_force(tiny64, brute, tmp_path, monkeypatch):
    sweeps = []
    real = align_command.exhaustive
    monkeypatch.setattr(align_command, "exhaustive", lambda config, adapter=None: sweeps.append(config.layer) or real(config, adapter))
    result = run(_config(tmp_path), tiny64)
    assert sweeps == ["0,1,2"]  # one sweep reads every layer
    entries = [brute[layer] for layer in range(3)]
    torch.testing.assert_close(result.overlap, _expected(entries), rtol=0, atol=1e-12)
    assert torch.equal(result.overlap.diagonal(), torch.ones(3, dtype=torch.float64))
    document = json.loads((tmp_path / "align" / "align.json").read_text())
    perm = document["run"]["permutation"]
    assert sorted(perm) == list(range(64)) and all(p != f for f, p in enumerate(perm))  # a derangement
    torch.testing.assert_close(result.baseline, _expected(entries, perm), rtol=0, atol=1e-12)
    assert result.baseline.max() < 0.5 < result.overlap.diagonal().min()
    # The document: matrices, seed, dtype, model, versions, and every feature's overlap per pair.
    assert document["overlap"] == result.overlap.tolist() and document["baseline"] == result.baseline.tolist()
    assert document["run"]["seed"] == 0 and document["run"]["dtypes"] == ["float64"]
    assert document["run"]["model"] == "tiny-llama" and "torch" in document["run"]["versions"]
    pairs = document["per_feature"]["pairs"]
    assert pairs == [[0, 1], [0, 2], [1, 2]]
    for (i, j), row in zip(pairs, document["per_feature"]["overlap"]):
        assert row == pytest.approx([len(a & b) / K for a, b in zip(entries[i], entries[j])])
    png = (tmp_path / "align" / "align.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 150_000


def test_top1_is_the_share_of_equal_best_tokens(tiny64, tmp_path):
    result = run(_config(tmp_path, layer="0,2", top_k=1), tiny64)
    best = {}
    with torch.no_grad():
        for layer in (0, 2):
            acts = resid_post(tiny64.model, torch.arange(tiny64.vocab_size)[:, None], layer)[:, 0]  # [vocab, d_model]
            best[layer] = acts.argmax(0)
    assert float(result.top1[0, 1]) == pytest.approx(float((best[0] == best[2]).double().mean()))
    assert float(result.top1[0, 1]) == pytest.approx(float(result.overlap[0, 1]))  # k = 1: the same thing


def test_from_reads_the_sweep_back(tiny64, tmp_path):
    swept = run(_config(tmp_path, layer="0-2"), tiny64)
    again = run(_config(tmp_path, from_=str(tmp_path / "align" / "exhaustive"), out=str(tmp_path / "again")))
    assert torch.equal(again.overlap, swept.overlap) and torch.equal(again.baseline, swept.baseline)
    fewer = run(_config(tmp_path, from_=str(tmp_path / "align" / "exhaustive"), layer="1,2", top_k=3, out=str(tmp_path / "f")))
    assert [e.label for e in fewer.entries] == ["L1", "L2"] and fewer.entries[0].ids.shape[1] == 3
    with pytest.raises(FeatoptError, match="fewer than --top_k"):
        run(_config(tmp_path, from_=str(tmp_path / "align" / "exhaustive"), top_k=K + 1, out=str(tmp_path / "g")))
    with pytest.raises(FeatoptError, match="no resid_post sweep at layer"):
        run(_config(tmp_path, from_=str(tmp_path / "align" / "exhaustive"), layer="1,5", out=str(tmp_path / "g")))
    assert not (tmp_path / "g").exists()


def test_isolated_sweeps_each_block_alone(tiny64, tmp_path, monkeypatch):
    sweeps = []
    real = align_command.exhaustive
    monkeypatch.setattr(align_command, "exhaustive", lambda config, adapter=None: sweeps.append(config.layer) or real(config, adapter))
    run(_config(tmp_path, layer="1,2", out=str(tmp_path / "full")), tiny64)
    sweeps.clear()
    result = run(_config(tmp_path, layer="1,2", isolated=True), tiny64)
    assert sweeps == ["1", "2"]  # an isolated block cannot share a forward with another
    sets = []
    with torch.no_grad():
        for layer in (1, 2):  # the block alone: a copy of the model holding only that block
            alone = copy.deepcopy(tiny64.model)
            alone.model.layers = torch.nn.ModuleList([alone.model.layers[layer]])
            ids = torch.arange(tiny64.vocab_size)[:, None]
            sets.append(_sets(resid_post(alone, ids, 0)[:, 0]))
    torch.testing.assert_close(result.overlap, _expected(sets), rtol=0, atol=1e-12)
    assert [e.label for e in result.entries] == ["L1 iso", "L2 iso"]
    # --from a whole align folder reads the per-layer sweeps beside the full ones, one matrix
    both = run(_config(tmp_path, from_=f"{tmp_path / 'full'},{tmp_path / 'align'}", out=str(tmp_path / "both")))
    assert [e.label for e in both.entries] == ["L1", "L2", "L1 iso", "L2 iso"]
    torch.testing.assert_close(both.overlap[2:, 2:], result.overlap, rtol=0, atol=0)


def test_the_permutation_is_fixed_by_the_seed():
    assert torch.equal(align.derangement(50, 3), align.derangement(50, 3))
    assert not torch.equal(align.derangement(50, 3), align.derangement(50, 4))
    with pytest.raises(FeatoptError, match="at least two features"):
        align.derangement(1, 0)


def _not_exhaustive(tmp_path):
    path = tmp_path / "greedy.json"
    path.write_text(json.dumps({"run": {"method": "greedy"}, "results": []}))
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--layer", "1"], "compares at least two"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--site", "resid_post,mlp_out"], "several kinds"),
    (["--features", "[:, :, 3]"], "at least two features"),
    (["--from", "NOT_EXHAUSTIVE"], "not an exhaustive sweep"),
    (["--from", "MISSING"], "not a readable results.json"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(flags, message, tmp_path, capsys):
    flags = [{"NOT_EXHAUSTIVE": _not_exhaustive(tmp_path), "MISSING": str(tmp_path / "none.json")}.get(f, f) for f in flags]
    out = tmp_path / "out"
    assert main(["align", "--model", "tiny-llama", "--no_progress", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featopt: error:") and message in err and "\n" not in err
    assert not out.exists()
