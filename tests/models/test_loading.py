"""load_model: built-ins, local folders, FEATOPT_MODEL_PATH, GGUF caching, untrained re-init, errors."""

import functools
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from featopt import cache
from featopt.errors import FeatoptError
from featopt.models import loading
from featopt.models.loading import LoadedModel, gguf_cache_folder, load_model
from featopt.models.tiny import TINY_MODELS, build_tiny, tiny_tokenizer

SHARED_MODELS = os.environ.get("FEATOPT_MODEL_PATH") or str(Path(__file__).resolve().parents[2].parent / "shared" / "models")
HAVE_SHARED_MODELS = any(Path(p).is_dir() for p in SHARED_MODELS.split(os.pathsep) if p)
USER_CACHE = os.environ.get("FEATOPT_CACHE")  # read before the autouse fixture replaces it


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No network, no model path, a throw-away cache: each test sees only what it sets up."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEATOPT_MODEL_PATH", raising=False)


def _save_tiny(folder: Path, name: str = "tiny-llama", seed: int = 0):
    model, tok = build_tiny(name, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _ready(lm: LoadedModel):
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("name", TINY_MODELS)
def test_builtin_names(name):
    lm = load_model(name)
    _ready(lm)
    assert (lm.name, lm.source, lm.untrained, lm.seed) == (name, "built-in", False, None)
    assert _same_weights(lm.model, build_tiny(name)[0])
    assert lm.model.config.vocab_size == len(lm.tokenizer)


def test_dtype_is_applied():
    lm = load_model("tiny-gpt2", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in lm.model.parameters())


def test_local_hf_folder(tmp_path):
    model, tok = _save_tiny(tmp_path / "saved")
    lm = load_model(str(tmp_path / "saved"))
    _ready(lm)
    assert lm.source == str((tmp_path / "saved").resolve())
    assert _same_weights(lm.model, model)
    ids = torch.tensor([tok("Once upon a time, in a folder.").input_ids])
    assert lm.tokenizer("Once upon a time, in a folder.").input_ids == ids[0].tolist()
    with torch.no_grad():
        # The reload may pick sdpa instead of eager attention: same weights, same math, but
        # a different summation order, so equal up to float rounding.
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        lm.model.set_attn_implementation("eager")
        assert torch.equal(lm.model(ids).logits, model(ids).logits)


def test_model_path_lookup(tmp_path, monkeypatch):
    root = tmp_path / "models"
    model, _ = _save_tiny(root / "mymodel-v1-extra")
    (root / "mymodel-notes").mkdir()  # a prefix match without a model: ignored
    monkeypatch.setenv("FEATOPT_MODEL_PATH", os.pathsep.join([str(tmp_path / "absent"), str(root)]))
    for name in ["mymodel", "MyModel-V1", "mymodel-v1-extra"]:
        lm = load_model(name)
        assert lm.name == name and lm.source == str((root / "mymodel-v1-extra").resolve())
        assert _same_weights(lm.model, model)
    # Only whole dash-separated prefixes match; the error lists what is there.
    with pytest.raises(FeatoptError, match=r"'mymodel-v'.*mymodel-v1-extra"):
        load_model("mymodel-v")


def test_model_path_exact_name_wins_and_ambiguity_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "models"
    exact, _ = _save_tiny(root / "mymodel", seed=1)
    _save_tiny(root / "mymodel-a", seed=2)
    _save_tiny(root / "mymodel-b", seed=3)
    monkeypatch.setenv("FEATOPT_MODEL_PATH", str(root))
    assert _same_weights(load_model("mymodel").model, exact)
    (root / "mymodel" / "config.json").unlink()
    with pytest.raises(FeatoptError, match="ambiguous.*mymodel-a, mymodel-b"):
        load_model("mymodel")


def test_untrained_builtin_is_deterministic_and_differs_from_trained():
    trained = load_model("tiny-llama")
    a = load_model("tiny-llama", untrained=True, seed=5)
    b = load_model("tiny-llama", untrained=True, seed=5)
    c = load_model("tiny-llama", untrained=True, seed=6)
    _ready(a)
    assert (a.untrained, a.seed, trained.seed) == (True, 5, None)
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, c.model)
    assert not _same_weights(a.model, trained.model)
    assert type(a.model) is type(trained.model)
    assert a.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    # seed 0 too: build_tiny's own stream is salted with the name, so it is never the re-init's.
    assert not _same_weights(load_model("tiny-llama", untrained=True).model, trained.model)


def test_untrained_local_folder(tmp_path):
    model, _ = _save_tiny(tmp_path / "saved", name="tiny-neox")
    a = load_model(str(tmp_path / "saved"), untrained=True, seed=1)
    b = load_model(str(tmp_path / "saved"), untrained=True, seed=1)
    assert _same_weights(a.model, b.model) and not _same_weights(a.model, model)
    assert a.model.config.num_hidden_layers == model.config.num_hidden_layers


def test_unknown_name_offline_is_one_clear_sentence():
    with pytest.raises(FeatoptError) as info:
        load_model("no-such-org/no-such-model")
    msg = str(info.value)
    assert "'no-such-org/no-such-model'" in msg and "tiny-gpt2, tiny-llama, tiny-neox" in msg
    assert "FEATOPT_MODEL_PATH" in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg and msg.endswith(".")
    assert isinstance(info.value, ValueError)


def test_tokenizer_only_folder_is_not_a_model(tmp_path, monkeypatch):
    tiny_tokenizer().save_pretrained(tmp_path / "models" / "tok-only")
    with pytest.raises(FeatoptError, match="only a tokenizer"):
        load_model(str(tmp_path / "models" / "tok-only"))
    monkeypatch.setenv("FEATOPT_MODEL_PATH", str(tmp_path / "models"))
    with pytest.raises(FeatoptError, match="only a tokenizer"):
        load_model("tok-only")


def test_bad_local_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FeatoptError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "two").mkdir()
    for n in ["a.gguf", "b.gguf"]:
        (tmp_path / "two" / n).write_bytes(b"GGUF")
    with pytest.raises(FeatoptError, match="several .gguf files"):
        load_model(str(tmp_path / "two"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatoptError, match="no model"):
        load_model(str(tmp_path / "empty"))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in .gguf: from_pretrained(..., gguf_file=...) returns tiny-llama instead of parsing it,
    so the cache logic is tested in a second; the real conversion is the slow test's job."""
    state = SimpleNamespace(path=tmp_path / "ggufs" / "Tiny.Q4_1.gguf", calls=[], race=False)
    state.path.parent.mkdir()
    state.path.write_bytes(b"GGUF not really")
    real_model, real_tok = loading.AutoModelForCausalLM.from_pretrained, loading.AutoTokenizer.from_pretrained

    def model_from_pretrained(where, *args, gguf_file=None, quantization_config=None, **kw):
        if gguf_file is None:
            return real_model(where, *args, **kw)
        state.calls.append(Path(where) / gguf_file)
        if state.race:  # another process finishes its conversion while this one runs
            cache.entry(gguf_cache_folder(state.path), functools.partial(_save_tiny, seed=9))
        return build_tiny("tiny-llama")[0]

    def tok_from_pretrained(where, *args, gguf_file=None, **kw):
        return tiny_tokenizer() if gguf_file else real_tok(where, *args, **kw)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", tok_from_pretrained)
    return state


def test_gguf_is_converted_once_then_read_from_the_cache(fake_gguf, tmp_path, monkeypatch):
    first = load_model(str(fake_gguf.path))
    folder = gguf_cache_folder(fake_gguf.path)
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("Tiny.Q4_1-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert first.source == str(fake_gguf.path.resolve()) and fake_gguf.calls == [fake_gguf.path]
    # By folder too (it holds exactly one .gguf), and by name under FEATOPT_MODEL_PATH: no new conversion.
    monkeypatch.setenv("FEATOPT_MODEL_PATH", str(tmp_path))
    for name in [str(fake_gguf.path.parent), "ggufs"]:
        again = load_model(name)
        assert again.source == first.source and _same_weights(again.model, first.model)
    assert len(fake_gguf.calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    # Touching the file changes its fingerprint: converted again, into a new folder.
    os.utime(fake_gguf.path, ns=(1, 1))
    assert gguf_cache_folder(fake_gguf.path) != folder
    load_model(str(fake_gguf.path))
    assert len(fake_gguf.calls) == 2


def test_gguf_conversion_race_uses_the_winners_folder(fake_gguf):
    fake_gguf.race = True
    lm = load_model(str(fake_gguf.path))
    assert _same_weights(lm.model, build_tiny("tiny-llama", seed=9)[0])  # the winner's weights
    folder = gguf_cache_folder(fake_gguf.path)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_gguf_needs_the_gguf_package(fake_gguf, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(FeatoptError, match=r'pip install "featopt\[gguf\]"'):
        load_model(str(fake_gguf.path))
    assert fake_gguf.calls == []


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SHARED_MODELS, reason=f"no real models at {SHARED_MODELS}")
def test_real_gguf_smollm2(monkeypatch):
    monkeypatch.setenv("FEATOPT_MODEL_PATH", SHARED_MODELS)
    # The persistent cache (the user's FEATOPT_CACHE, else ~/.cache/featopt): the ~30 s
    # conversion happens once per machine, not once per test run.
    if USER_CACHE:
        monkeypatch.setenv("FEATOPT_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("FEATOPT_CACHE")
    lm = load_model("smollm2-135m-instruct")
    _ready(lm)
    assert lm.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.model.config.num_hidden_layers == 30
    ids = lm.tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert lm.tokenizer.decode(out[0, ids.shape[1]:]).startswith(", the city of Nova Haven")

    # The second load reads the cached folder: no GGUF parsing, the same weights. (Not timed: a
    # wall-clock bound fails on a slow or busy machine; no_gguf below is what proves the cache hit.)
    real = loading.AutoModelForCausalLM.from_pretrained

    def no_gguf(where, *args, **kwargs):
        assert "gguf_file" not in kwargs, "converted the GGUF again instead of reading the cache"
        return real(where, *args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load_model("smollm2-135m-instruct")
    assert (gguf_cache_folder(Path(again.source)) / "config.json").is_file()
    assert again.source == lm.source and _same_weights(again.model, lm.model)


def test_a_model_that_needs_its_own_code_is_refused_without_the_flag(tmp_path):
    """A folder whose config names Python files to run: one sentence naming --trust_remote_code,
    and the folder's code never runs (it would exit the test process)."""
    import json

    _save_tiny(tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    config.update(model_type="featopt_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                         "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (tmp_path / "custom" / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (tmp_path / "custom" / name).write_text("raise SystemExit('the model folder ran its own code')\n")
    for untrained in (False, True):
        with pytest.raises(FeatoptError) as info:
            load_model(str(tmp_path / "custom"), untrained=untrained)
        msg = str(info.value)
        assert "--trust_remote_code" in msg and "\n" not in msg and msg.endswith(".")
