"""Results never hold NaN or infinity silently: a diverged run writes null plus `"diverged": true`,
says so on stderr, and its results.json stays strict JSON; old files without the flag still read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from featopt.cli import main
from featopt.interrupt import Interrupted
from featopt.results import FeatureResult, atomic_write, read_results, write_results


def _strict(path) -> dict:
    def refuse(token):
        raise AssertionError(f"bare {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _optimize(tmp_path, capsys, lr: str):
    out = tmp_path / f"lr{lr}"
    code = main(["optimize", "--model", "tiny-gpt2", "--features", "[:, :, 0-2]", "--tokens", "2", "--steps", "4",
                 "--lr", lr, "--no_progress", "--out", str(out)])
    assert code == 0
    return out, capsys.readouterr().err


def test_a_diverged_run_is_flagged_and_its_json_stays_valid(tmp_path, capsys):
    out, err = _optimize(tmp_path, capsys, "1e30")
    embeddings = load_file(out / "embeddings.safetensors")["embeddings"]
    assert not torch.isfinite(embeddings).all()  # independent evidence: it did diverge
    document = _strict(out / "results.json")
    warning = [line for line in err.splitlines() if line.startswith("featopt: warning:")]
    assert len(warning) == 1 and "3 of 3 results hold NaN or infinity" in warning[0] and "lower --lr" in warning[0]
    for record in document["results"]:
        assert record["diverged"] is True
        assert record["spec"] in warning[0]
        assert record["continuous_activation"] is None  # was NaN: null, not a number that looks real
    _, results = read_results(out)
    assert all(r.diverged for r in results)


def test_a_sane_run_is_not_flagged(tmp_path, capsys):
    out, err = _optimize(tmp_path, capsys, "0.05")
    assert "warning" not in err
    assert not any(r["diverged"] for r in _strict(out / "results.json")["results"])


def test_only_the_problems_with_nonfinite_numbers_or_tensor_rows_are_flagged(tmp_path, capsys):
    def result(spec, activation, cosine):
        return FeatureResult(spec=spec, site="s", method="m", objective="o", token_ids=[1], tokens=["a"], text="a",
                             activation=activation, token_cosine=cosine)

    results = [result("a", 1.0, [0.5]), result("b", float("inf"), [0.5]), result("c", 2.0, [float("nan")]),
               result("d", 3.0, [0.1])]
    embeddings = torch.ones(4, 1, 2)
    embeddings[3, 0, 1] = float("-inf")
    write_results(tmp_path, results, {"target": float("nan")}, {"embeddings": embeddings})
    document = _strict(tmp_path / "results.json")
    assert [r["diverged"] for r in document["results"]] == [False, True, True, True]
    assert document["results"][1]["activation"] is None and document["results"][2]["token_cosine"] == [None]
    assert document["run"]["target"] is None
    assert "3 of 4 results" in capsys.readouterr().err
    assert math.isinf(results[1].activation)  # the objects keep their numbers; only the file says null


def test_files_written_before_the_flag_still_read(tmp_path):
    write_results(tmp_path, [FeatureResult(spec="a", site="s", method="m", objective="o", token_ids=[1], tokens=["a"],
                                           text="a", activation=1.0)], {})
    document = json.loads((tmp_path / "results.json").read_text())
    del document["results"][0]["diverged"]
    (tmp_path / "results.json").write_text(json.dumps(document))
    assert read_results(tmp_path)[1][0].diverged is False


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')

    def half_then_signal(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise Interrupted(15)

    with pytest.raises(Interrupted):
        atomic_write(path, half_then_signal)
    assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_fast_search_writer_flags_the_same_way(tmp_path, capsys):
    from featopt.results import write_plain_results

    results = [FeatureResult(spec=s, site="s", method="m", objective="o", token_ids=[1], tokens=["NaN"], text="NaN",
                             activation=a) for s, a in (("a", 1.0), ("b", float("-inf")))]
    write_plain_results(tmp_path / "fast", results, {})
    write_results(tmp_path / "slow", results, {})
    fast = _strict(tmp_path / "fast" / "results.json")
    assert [r["diverged"] for r in fast["results"]] == [False, True] and fast["results"][1]["activation"] is None
    assert fast["results"] == _strict(tmp_path / "slow" / "results.json")["results"]
    assert capsys.readouterr().err.count("featopt: warning: 1 of 2 results hold NaN or infinity") == 2
