"""Corpus statistics against a brute force that keeps every activation: the latents of every
token, from a plain HF forward (`output_hidden_states=True`) and the SAE, sorted, binned and
sliced in numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from featopt.data import corpus_contexts
from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.dictionaries.corpus_stats import StatsAccumulator, corpus_stats
from featopt.dictionaries.feature_stats import FeatureStats
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D, L, N_CTX, D_SAE = 64, 12, 30, 24
SITE = "blocks.1.resid_post"
SETTINGS = dict(top_k=5, n_bins=4, window=(3, 2))


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def contexts(llama):
    return torch.randint(1, llama.vocab_size, (N_CTX, L), generator=torch.Generator().manual_seed(1))


def hidden(adapter, ids):
    with torch.no_grad():
        return adapter.model(ids, output_hidden_states=True).hidden_states[2]  # after block 1


@pytest.fixture(scope="module")
def sae(llama, contexts):
    """A relu SAE that fires on about a third of the tokens, on values spread over decades; latent 0
    never fires, latent 1 nearly always."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture="relu", hook_name=SITE))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        pre = sae.pre_acts(hidden(llama, contexts)).reshape(-1, D_SAE)
        sae.W_enc /= pre.std(0)
        sae.W_enc *= torch.logspace(-1, 1, D_SAE)  # latents of very different scales
        pre = sae.pre_acts(hidden(llama, contexts)).reshape(-1, D_SAE)
        sae.b_enc.copy_(-pre.quantile(0.65, dim=0))
        sae.b_enc[0], sae.b_enc[1] = -1e4, 1e2
    return sae


@pytest.fixture(scope="module")
def z(llama, sae, contexts):
    with torch.no_grad():
        return sae.encode(hidden(llama, contexts))  # [N_CTX, L, D_SAE]: every activation


def accumulate(z, ids, batch=4, skip_first=1, seed=0, **settings):
    acc = StatsAccumulator(z.shape[-1], **{**SETTINGS, **settings}, seed=seed)
    for start in range(0, len(z), batch):
        acc.update(z[start:start + batch], ids[start:start + batch], start, skip_first)
    return acc


# ----------------------------------------------------------------- the brute force
def positives(z, i, skip_first=1):
    """Latent i's positive activations (float64) and their global token indices."""
    values = z[:, skip_first:, i].double().numpy()
    index = (np.arange(z.shape[0])[:, None] * z.shape[1] + np.arange(skip_first, z.shape[1])).ravel()
    values = values.ravel()
    return values[values > 0], index[values > 0]


def brute_top(z, i, k):
    values, index = positives(z, i)
    order = np.lexsort((index, -values))[:k]  # value descending, then index ascending
    return values[order], index[order]


def brute_window(z, ids, i, g, window):
    c, p = divmod(int(g), z.shape[1])
    before, after = window
    tokens, acts = [], []
    for q in range(p - before, p + after + 1):
        inside = 0 <= q < z.shape[1]
        tokens.append(int(ids[c, q]) if inside else -1)
        acts.append(float(z[c, q, i]) if inside else 0.0)
    return tokens, acts


def power_of_two_width(maximum, n_bins):
    if maximum <= 0:
        return 0.0
    w = 2.0 ** math.floor(math.log2(maximum / n_bins))
    while n_bins * w <= maximum:
        w *= 2
    while n_bins * w / 2 > maximum:
        w /= 2
    return w


# ----------------------------------------------------------------- statistics
def test_fixture_sae_has_dead_busy_and_sparse_latents(z):
    fires = (z[:, 1:] > 0).double().mean((0, 1))
    assert fires[0] == 0 and fires[1] > 0.95 and 0.2 < fires[2:].mean() < 0.5


def test_top_examples_frequency_max_and_sum_equal_the_brute_force(z, contexts):
    stats = accumulate(z, contexts).result()
    k = SETTINGS["top_k"]
    assert stats.tokens == N_CTX * (L - 1)
    for i in range(D_SAE):
        values, index = brute_top(z, i, k)
        n = len(values)
        np.testing.assert_array_equal(stats.top_values[i, :n].numpy(), values.astype(np.float32))
        np.testing.assert_array_equal(stats.top_index[i, :n].numpy(), index)
        assert (stats.top_index[i, n:] == -1).all() and (stats.top_values[i, n:] == 0).all()
        all_values, _ = positives(z, i)
        assert int(stats.freq[i]) == len(all_values)
        assert float(stats.max[i]) == (all_values.max() if len(all_values) else 0.0)
        assert float(stats.sum[i]) == pytest.approx(all_values.sum(), rel=1e-12, abs=1e-12)
    assert (stats.top_index[0] == -1).all() and stats.freq[0] == 0  # the dead latent


def test_positions_before_skip_first_never_count(z, contexts):
    stats = accumulate(z, contexts, skip_first=3).result()
    assert stats.tokens == N_CTX * (L - 3)
    for index in (stats.top_index, stats.bin_index):
        assert ((index < 0) | (index % L >= 3)).all()
    assert int(stats.freq.sum()) == int((z[:, 3:] > 0).sum())


def test_histograms_equal_numpy_with_the_power_of_two_width(z, contexts):
    n_bins = SETTINGS["n_bins"]
    stats = accumulate(z, contexts).result()
    for i in range(D_SAE):
        values, _ = positives(z, i)
        w = float(stats.bin_width[i])
        assert w == power_of_two_width(values.max() if len(values) else 0.0, n_bins)
        if len(values):
            assert n_bins * w > values.max() >= n_bins * w / 2
            counts, _ = np.histogram(values, bins=np.arange(n_bins + 1) * w)
            np.testing.assert_array_equal(stats.bin_counts[i].numpy(), counts)
    assert stats.bin_width[0] == 0 and (stats.bin_counts[0] == 0).all()


def test_bins_are_merged_when_the_width_doubles():
    # One latent: 0.3 and 0.4 (width 1/8: bins 2 and 3), then 0.7 and 3.0 (width 1: all in bin 0).
    z = torch.tensor([0.0, 0.3, 0.4, 0.0, 0.7, 3.0]).view(2, 3, 1)
    acc = StatsAccumulator(1, top_k=2, n_bins=4, window=(0, 0))
    acc.update(z[:1], torch.zeros(1, 3), 0, skip_first=0)
    assert acc.state["bin_width"].item() == 0.125 and acc.state["bin_counts"][0].tolist() == [0, 0, 1, 1]
    acc.update(z[1:], torch.zeros(1, 3), 1, skip_first=0)
    stats = acc.result()
    assert stats.bin_width.item() == 1.0 and stats.bin_counts[0].tolist() == [3, 0, 0, 1]
    assert stats.bin_index[0].tolist()[1:] == [-1, -1, 5] and stats.bin_index[0, 0].item() in (1, 2, 4)


def test_uniform_examples_lie_in_their_bins_with_their_true_activation(z, contexts):
    stats = accumulate(z, contexts).result()
    flat = z.reshape(-1, D_SAE)
    for i in range(D_SAE):
        w = float(stats.bin_width[i])
        for b in range(SETTINGS["n_bins"]):
            g = int(stats.bin_index[i, b])
            assert (g >= 0) == (stats.bin_counts[i, b] > 0)  # every non-empty bin has an example
            if g >= 0:
                value = float(stats.bin_values[i, b])
                assert value == float(flat[g, i]) and b * w <= value < (b + 1) * w and g % L >= 1


def test_windows_are_the_brute_force_context_slices(z, contexts):
    window = (4, 3)
    stats = accumulate(z, contexts, window=window).result()
    checked = 0
    for kind in ("top", "bin"):
        index, tokens, acts = (getattr(stats, f"{kind}_{name}") for name in ("index", "tokens", "acts"))
        for i in range(D_SAE):
            for j in range(index.shape[1]):
                if index[i, j] >= 0:
                    want_tokens, want_acts = brute_window(z, contexts, i, index[i, j], window)
                    assert tokens[i, j].tolist() == want_tokens
                    assert acts[i, j].tolist() == pytest.approx(want_acts, abs=0)
                    checked += 1
    assert checked > 100


def test_batch_sizes_do_not_change_the_top_examples_or_histograms(z, contexts):
    runs = [accumulate(z, contexts, batch=b).result() for b in (1, 7, N_CTX)]
    for other in runs[1:]:
        for name in ("top_values", "top_index", "top_tokens", "top_acts", "bin_width", "bin_counts", "freq", "max"):
            assert torch.equal(getattr(runs[0], name), getattr(other, name)), name
        torch.testing.assert_close(runs[0].sum, other.sum, rtol=1e-12, atol=1e-12)


def test_ties_go_to_the_earlier_token_whatever_the_batches():
    z = torch.full((6, 4, 1), 2.0)  # all equal: the top is the first tokens
    for batch in (1, 4, 6):
        acc = StatsAccumulator(1, top_k=3, n_bins=2, window=(1, 1))
        for start in range(0, 6, batch):
            acc.update(z[start:start + batch], torch.zeros(min(batch, 6 - start), 4), start, skip_first=1)
        assert acc.result().top_index[0].tolist() == [1, 2, 3]


def test_sampling_is_seeded(z, contexts):
    a, b = (accumulate(z, contexts, seed=5).result() for _ in range(2))
    for name in ("bin_index", "bin_values", "bin_tokens", "bin_acts"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    others = [accumulate(z, contexts, seed=s).result().bin_index for s in (6, 7, 8)]
    assert any(not torch.equal(a.bin_index, other) for other in others)


def test_a_bin_sample_is_uniform_over_seeds():
    """Bin [0.25, 0.5) of width 1/4 gets 0.3 and 0.4 in the first batch (then in bins 2 and 3
    of width 1/8: merged on the way) and 0.45 in the second: each third of the time. A bin of two
    items in one batch: each half the time. Binomial bounds of about 6 sigma: deterministic
    seeds, never flaky in practice."""
    trials = 600
    z = torch.tensor([[0.3, 0.4, 0.0], [0.7, 0.45, 0.0]]).view(2, 3, 1)
    picks = np.zeros(6, dtype=int)
    pairs = np.zeros(12, dtype=int)
    pair_z = torch.tensor([0.5, 0.6, 0.0, 0.0]).view(1, 4, 1)
    for seed in range(trials):
        acc = StatsAccumulator(1, top_k=1, n_bins=4, window=(0, 0), seed=seed)
        acc.update(z[:1], torch.zeros(1, 3), 0, skip_first=0)
        acc.update(z[1:], torch.zeros(1, 3), 1, skip_first=0)
        assert acc.state["bin_width"].item() == 0.25 and acc.state["bin_counts"][0].tolist() == [0, 3, 1, 0]
        picks[acc.state["bin_index"][0, 1]] += 1
        acc = StatsAccumulator(1, top_k=1, n_bins=4, window=(0, 0), seed=seed)
        acc.update(pair_z, torch.zeros(1, 4), 0, skip_first=0)
        pairs[acc.state["bin_index"][0, 2]] += 1  # width 1/4: 0.5 and 0.6 both in bin 2
    third = trials / 3
    assert picks[[2, 5, 3]].sum() == 0 and all(abs(picks[g] - third) < 6 * math.sqrt(trials * 2 / 9) for g in (0, 1, 4))
    assert pairs.sum() == trials and abs(pairs[0] - trials / 2) < 6 * math.sqrt(trials / 4)


def test_memory_is_flat_in_the_number_of_batches(z, contexts):
    acc = StatsAccumulator(D_SAE, **SETTINGS)
    acc.update(z[:2], contexts[:2], 0)
    sizes = {name: tuple(t.shape) for name, t in acc.state.items()}
    for start in range(2, N_CTX, 2):
        acc.update(z[start:start + 2], contexts[start:start + 2], start)
    assert {name: tuple(t.shape) for name, t in acc.state.items()} == sizes
    assert all(shape[0] == D_SAE for shape in sizes.values())
    held = [name for name, v in vars(acc).items() if isinstance(v, (torch.Tensor, list))]
    assert held == []  # nothing else can grow: no tensors or lists besides the fixed-size state


# ----------------------------------------------------------------- the pass, records, files
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("The cat sat on the mat and looked at the dog by the door. " * 6)
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("Numbers: 1 2 3 4 5 and the weather today is warm and sunny. " * 5)
    return root


def test_corpus_stats_runs_the_model_and_names_sources(llama, sae, corpus):
    ids, sources = corpus_contexts(llama.tokenizer, corpus, L, split="all", with_sources=True)
    stats = corpus_stats(llama, sae, ids, sources=sources, batch_contexts=3, seed=2, progress=False, **SETTINGS)
    z = hidden(llama, ids)
    with torch.no_grad():
        z = sae.encode(z)
    for i in range(D_SAE):
        values, _ = brute_top(z, i, SETTINGS["top_k"])
        torch.testing.assert_close(stats.top_values[i, :len(values)], torch.tensor(values, dtype=torch.float32))
        kept = stats.top_index[i][stats.top_index[i] >= 0]
        torch.testing.assert_close(z.reshape(-1, D_SAE)[kept, i], stats.top_values[i, :len(kept)])
    assert stats.documents == ["a.txt", "sub/b.txt"]
    texts = {name: (corpus / name).read_text() for name in stats.documents}
    located = 0
    for kind in ("top", "bin"):
        index, doc, pos = (getattr(stats, f"{kind}_{name}") for name in ("index", "doc", "pos"))
        for g, d, p in zip(index.flatten().tolist(), doc.flatten().tolist(), pos.flatten().tolist()):
            if g >= 0 and d >= 0:
                doc_ids = llama.tokenizer.encode(texts[stats.documents[d]], add_special_tokens=False)
                assert doc_ids[p] == int(ids.view(-1)[g])
                located += 1
            elif g >= 0:
                assert int(ids.view(-1)[g]) == llama.tokenizer.eos_token_id and p == -1
    assert located > 50
    assert stats.meta["model"] == llama.name and stats.meta["sae"] == sae.describe()
    assert stats.meta["seed"] == 2 and stats.meta["skip_first"] == 1 and stats.meta["tokens"] == stats.tokens


def test_save_and_load_round_trip(z, contexts, tmp_path):
    stats = accumulate(z, contexts).result(meta={"note": "x"})
    stats.save(tmp_path / "stats")
    header = json.loads((tmp_path / "stats" / "features.json").read_text())
    assert header["version"] == 1 and header["d_sae"] == D_SAE and header["window"] == [3, 2]
    loaded = FeatureStats.load(tmp_path / "stats")
    for name, value in vars(stats).items():
        other = getattr(loaded, name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), name
        else:
            assert value == other, name
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["features.json", "features.safetensors"]
    with pytest.raises(FeatoptError, match="holds no corpus statistics"):
        FeatureStats.load(tmp_path)


EX_KEYS = {"activation", "context", "index", "document", "position", "tokens", "acts", "target"}


def test_record_schema(llama, z, contexts):
    stats = accumulate(z, contexts, window=(4, 2)).result()
    decode = lambda t: llama.tokenizer.decode([t])  # noqa: E731
    for i in (0, 1, 5):
        record = stats.record(i, decode)
        json.dumps(record)
        assert set(record) == {"latent", "tokens", "fires", "frequency", "max", "mean_when_active", "histogram",
                               "top_examples", "uniform_examples"}
        values, _ = positives(z, i)
        assert record["latent"] == i and record["tokens"] == N_CTX * (L - 1) and record["fires"] == len(values)
        assert record["frequency"] == pytest.approx(len(values) / record["tokens"])
        assert record["mean_when_active"] == pytest.approx(values.mean() if len(values) else 0.0)
        assert set(record["histogram"]) == {"bin_width", "counts"} and len(record["histogram"]["counts"]) == 4
        assert len(record["top_examples"]) == min(5, len(values))
        bins = [u["bin"] for u in record["uniform_examples"]]
        assert bins == sorted(bins)
        for ex in record["top_examples"] + record["uniform_examples"]:
            assert EX_KEYS <= set(ex) and ex["document"] is None and ex["position"] is None
            assert isinstance(ex["context"], int) and isinstance(ex["index"], int)
            assert len(ex["tokens"]) == len(ex["acts"]) <= 7
            assert ex["tokens"][ex["target"]] == decode(int(contexts[ex["context"], ex["index"]]))
            assert ex["acts"][ex["target"]] == ex["activation"] == pytest.approx(float(z[ex["context"], ex["index"], i]))
            assert ex["target"] == min(4, ex["index"])
        for u in record["uniform_examples"]:
            assert set(u) == EX_KEYS | {"bin", "count"} and u["bin"][0] <= u["activation"] < u["bin"][1] and u["count"] > 0
    assert record["top_examples"][0]["activation"] == float(z[:, 1:, 5].max())
    assert stats.record(0, decode)["top_examples"] == [] and stats.record(0, decode)["uniform_examples"] == []


def test_bad_input_is_one_sentence(z, contexts):
    acc = StatsAccumulator(D_SAE)
    with pytest.raises(FeatoptError, match="expected latents"):
        acc.update(z[:2, :, :3], contexts[:2], 0)
    with pytest.raises(FeatoptError, match="no batch"):
        acc.result()
    acc.update(z[:2], contexts[:2], 0)
    with pytest.raises(FeatoptError, match="one context length"):
        acc.update(z[:2, :5], contexts[:2, :5], 2)
    with pytest.raises(FeatoptError, match="latent 99"):
        acc.result().record(99, str)
    with pytest.raises(FeatoptError):
        StatsAccumulator(D_SAE, top_k=0)
