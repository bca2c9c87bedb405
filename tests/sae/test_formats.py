"""SAE files: featopt's round trip, and compatibility with the real libraries through committed
fixtures (tests/sae/fixtures, written by sae-lens and sparsify themselves: see make_fixtures.py).
No peer library is needed here: the expected numbers are the libraries' own, recorded."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from featopt.errors import FeatoptError
from featopt.models.sae.formats import load_sae, save_sae, site_of
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from tests.sae.fixtures.make_featopt_saved import fixture_sae

FIXTURES = Path(__file__).parent / "fixtures"
ARCHS = ["relu", "topk", "jumprelu"]


def random_sae(arch: str, seed: int = 0, **cfg) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    settings = dict(d_in=5, d_sae=12, architecture=arch, k=3 if arch == "topk" else None, hook_name="blocks.2.hook_resid_post",
                    model_name="some/model", metadata={"seed": seed, "nested": {"lr": 1e-3, "tags": ["a", "b"]}})
    sae = SparseAutoencoder(SAEConfig(**{**settings, **cfg}))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def assert_one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------- featopt's own round trip
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_round_trip_is_exact(tmp_path, arch, apply_b_dec):
    sae = random_sae(arch, apply_b_dec_to_input=apply_b_dec)
    out = save_sae(sae, tmp_path / "sae")
    back = load_sae(out)
    assert asdict(back.cfg) == asdict(sae.cfg)
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.content_hash() == sae.content_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_saved_files_are_saelens_layout(tmp_path):
    out = save_sae(random_sae("jumprelu"), tmp_path / "sae")
    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (5, 12), "b_enc": (12,), "W_dec": (12, 5), "b_dec": (5,), "threshold": (12,)}
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none" and cfg["dtype"] == "float32"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["featopt"]["metadata"]["nested"]["tags"] == ["a", "b"]
    relu = json.loads((save_sae(random_sae("relu"), tmp_path / "relu") / "cfg.json").read_text())
    assert relu["architecture"] == "standard"  # sae-lens' name for featopt's relu


@pytest.mark.parametrize("ours,theirs", [("blocks.3.mlp_hidden", "blocks.3.mlp.hook_post"), ("blocks.0.mlp_out", "blocks.0.hook_mlp_out"),
                                         ("blocks.1.resid_pre", "blocks.1.hook_resid_pre"), ("layers.4", "layers.4")])
def test_hook_names_are_written_in_transformerlens_spelling_and_read_back_in_ours(tmp_path, ours, theirs):
    sae = random_sae("relu", hook_name=ours)
    cfg = json.loads((save_sae(sae, tmp_path / "sae") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == theirs  # what sae-lens hooks a HookedTransformer by
    assert load_sae(tmp_path / "sae").cfg.hook_name == ours
    assert site_of(theirs) == site_of(ours) or ours == theirs


def test_bfloat16_weights_load_as_float32_and_record_the_file_dtype(tmp_path):
    sae = random_sae("topk").to(torch.bfloat16)
    out = save_sae(sae, tmp_path / "sae")
    assert json.loads((out / "cfg.json").read_text())["dtype"] == "bfloat16"
    back = load_sae(out)
    assert back.cfg.dtype == "bfloat16" and back.W_enc.dtype == torch.float32
    assert torch.equal(back.W_enc, sae.W_enc.float())
    assert load_sae(out, dtype=torch.bfloat16).W_dec.dtype == torch.bfloat16


def test_saving_again_replaces_featopt_folder(tmp_path):
    save_sae(random_sae("relu", seed=1), tmp_path / "sae")
    second = random_sae("topk", seed=2)
    save_sae(second, tmp_path / "sae")
    assert load_sae(tmp_path / "sae").content_hash() == second.content_hash()
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    save_sae(second, tmp_path / "empty")  # an empty folder is fine too
    assert load_sae(tmp_path / "empty").content_hash() == second.content_hash()


@pytest.mark.parametrize("make", ["foreign_file", "saelens_folder", "plain_file", "featopt_plus_extra"])
def test_save_refuses_folders_it_did_not_write(tmp_path, make):
    out = tmp_path / "out"
    if make == "foreign_file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif make == "saelens_folder":
        shutil.copytree(FIXTURES / "saelens" / "standard", out)
    elif make == "plain_file":
        out.write_text("mine")
    else:
        save_sae(random_sae("relu"), out)
        (out / "tensorboard").mkdir()
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    with pytest.raises(FeatoptError) as error:
        save_sae(random_sae("relu"), out)
    assert "not an SAE folder written by featopt" in assert_one_sentence(error)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    old = random_sae("relu", seed=5)
    save_sae(old, tmp_path / "kept")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_sae(random_sae("relu"), tmp_path / "new")
    with pytest.raises(OSError):
        save_sae(random_sae("relu"), tmp_path / "kept")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert load_sae(tmp_path / "kept").content_hash() == old.content_hash()


# ----------------------------------------------------------------------------------------- sae-lens' files in featopt
@pytest.mark.parametrize("lib_arch,arch,hook", [("standard", "relu", "blocks.1.hook_resid_post"),
                                                ("topk", "topk", "blocks.2.hook_mlp_out"),
                                                ("jumprelu", "jumprelu", "blocks.0.hook_attn_out")])
def test_saelens_files_load_and_match_saelens_outputs(lib_arch, arch, hook):
    folder = FIXTURES / "saelens" / lib_arch
    expected = load_file(str(folder / "expected.safetensors"))
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.model_name) == (arch, hook, "tiny-test-model")
    assert sae.cfg.k == (4 if arch == "topk" else None) and sae.cfg.apply_b_dec_to_input
    z = sae.encode(expected["x"]).detach()
    assert (expected["latents"] != 0).any() and (expected["latents"] == 0).any()  # not a vacuous comparison
    torch.testing.assert_close(z, expected["latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(expected["latents"]).detach(), expected["reconstruction"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- featopt's files in sae-lens
@pytest.mark.parametrize("arch", ARCHS)
def test_featopt_saved_fixture_is_what_save_sae_writes_and_saelens_reads_it_alike(tmp_path, arch):
    committed = FIXTURES / "featopt_saved" / arch
    out = save_sae(fixture_sae(arch), tmp_path / arch)
    fresh, old = load_file(str(out / "sae_weights.safetensors")), load_file(str(committed / "sae_weights.safetensors"))
    assert fresh.keys() == old.keys()
    for name in fresh:
        assert fresh[name].dtype == old[name].dtype and torch.equal(fresh[name], old[name]), name
    assert json.loads((out / "cfg.json").read_text()) == json.loads((committed / "cfg.json").read_text())
    # sae-lens' own SAE.load_from_disk read the committed files and recorded these outputs:
    recorded = load_file(str(committed / "saelens_outputs.safetensors"))
    sae = load_sae(committed)
    assert asdict(sae.cfg) == asdict(fixture_sae(arch).cfg)
    torch.testing.assert_close(sae.encode(recorded["x"]).detach(), recorded["latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(recorded["latents"]).detach(), recorded["reconstruction"], atol=1e-6, rtol=0)
    assert (recorded["latents"] != 0).sum() > 0


# ----------------------------------------------------------------------------------------- sparsify
SPARSIFY = FIXTURES / "sparsify" / "topk"


def test_sparsify_hookpoint_folder_loads_and_matches_sparsify_outputs():
    folder = SPARSIFY / "layers.1.mlp"
    expected = load_file(str(folder / "expected.safetensors"))
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_sae) == ("topk", 4, 16, 48)
    assert (sae.cfg.hook_name, sae.cfg.model_name) == ("layers.1.mlp", "tiny-test-model")
    assert site_of(sae.cfg.hook_name) == "blocks.1.mlp_out"
    torch.testing.assert_close(sae.encode(expected["x"]).detach(), expected["latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(expected["latents"]).detach(), expected["reconstruction"], atol=1e-6, rtol=0)
    # the layout itself, read without featopt: nn.Linear's [d_sae, d_in] encoder is W_enc transposed
    raw = load_file(str(folder / "sae.safetensors"))
    assert torch.equal(sae.W_enc, raw["encoder.weight"].T) and torch.equal(sae.W_dec, raw["W_dec"])
    assert load_sae(folder, hook_name="blocks.1.hook_mlp_out").cfg.hook_name == "blocks.1.hook_mlp_out"


def test_sparsify_checkpoint_root_names_its_hookpoints():
    with pytest.raises(FeatoptError) as error:
        load_sae(SPARSIFY)
    assert "layers.1.mlp" in assert_one_sentence(error)


# ----------------------------------------------------------------------------------------- Gemma Scope
def gemma_params(seed=0, d_in=6, d_sae=10, lower=False):
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32), "b_enc": rng.normal(size=d_sae).astype(np.float32),
              "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32), "b_dec": rng.normal(size=d_in).astype(np.float32),
              "threshold": rng.uniform(0.2, 1.5, size=d_sae).astype(np.float32)}
    if lower:
        params = {("w_" + k[2:] if k.startswith("W_") else k): v for k, v in params.items()}
    return params


def write_npz(folder: Path, params) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return folder / "params.npz"


@pytest.mark.parametrize("lower", [False, True])
def test_gemma_scope_npz_encodes_as_the_hand_formula(tmp_path, lower):
    params = gemma_params(lower=lower)
    file = write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_5", params)
    p = gemma_params()  # the same numbers, canonical names
    x = np.random.default_rng(9).normal(size=(7, 6)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's encoder: no b_dec subtracted
    z = np.where(pre > p["threshold"], pre, 0.0)
    assert 0 < (z != 0).sum() < z.size
    for path in (file, file.parent):
        sae = load_sae(path)
        assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.apply_b_dec_to_input) == ("jumprelu", "blocks.3.hook_resid_post", False)
        assert np.allclose(sae.encode(torch.from_numpy(x)).detach().numpy(), z, atol=1e-5)
        assert np.allclose(sae.decode(torch.from_numpy(z).float()).detach().numpy(), z @ p["W_dec"] + p["b_dec"], atol=1e-5)


def test_gemma_scope_layout_is_read_through_hugging_face_cache_links(tmp_path):
    blob = write_npz(tmp_path / "blobs", gemma_params())
    snapshot = tmp_path / "models--google--gemma-scope-2b-pt-mlp" / "snapshots" / "abc" / "layer_7" / "width_16k" / "average_l0_5"
    snapshot.mkdir(parents=True)
    (snapshot / "params.npz").symlink_to(blob)
    assert load_sae(snapshot / "params.npz").cfg.hook_name == "blocks.7.hook_mlp_out"
    assert load_sae(snapshot).cfg.hook_name == "blocks.7.hook_mlp_out"


def test_gemma_scope_hook_name_from_argument_or_layout(tmp_path):
    plain = write_npz(tmp_path / "plain", gemma_params())
    with pytest.raises(FeatoptError) as error:
        load_sae(plain)
    assert "hook_name" in assert_one_sentence(error)
    assert load_sae(plain, hook_name="blocks.4.hook_resid_post").cfg.hook_name == "blocks.4.hook_resid_post"
    mlp = write_npz(tmp_path / "gemma-scope-9b-pt-mlp" / "layer_12" / "width_16k" / "average_l0_9", gemma_params())
    assert load_sae(mlp).cfg.hook_name == "blocks.12.hook_mlp_out"


# ----------------------------------------------------------------------------------------- hook names
@pytest.mark.parametrize("hook,site", [
    ("blocks.6.hook_resid_post", "blocks.6.resid_post"), ("blocks.6.hook_mlp_out", "blocks.6.mlp_out"),
    ("blocks.6.hook_attn_out", "blocks.6.attn_out"), ("blocks.6.hook_resid_pre", "blocks.6.resid_pre"),
    ("blocks.6.mlp.hook_post", "blocks.6.mlp_hidden"), ("blocks.6.resid_post", "blocks.6.resid_post"),
    ("blocks.0.mlp_hidden", "blocks.0.mlp_hidden"), ("layers.6", "blocks.6.resid_post"), ("layers.6.mlp", "blocks.6.mlp_out"),
    ("layers.6.self_attn", "blocks.6.attn_out"), ("h.6", "blocks.6.resid_post"), ("h.6.mlp", "blocks.6.mlp_out"),
    ("h.6.attn", "blocks.6.attn_out"), ("transformer.h.6", "blocks.6.resid_post"), ("model.layers.6", "blocks.6.resid_post"),
    ("model.layers.11.mlp", "blocks.11.mlp_out"), ("gpt_neox.layers.6", "blocks.6.resid_post"),
    ("gpt_neox.layers.6.attention", "blocks.6.attn_out"),
])
def test_site_of(hook, site):
    assert site_of(hook) == site


@pytest.mark.parametrize("hook", ["blocks.6.attn.hook_z", "layers.6.mlp.down_proj", "embed_tokens", "", "resid_post",
                                  "blocks.x.hook_resid_post", "decoder.layers.6"])
def test_site_of_rejects_other_names(hook):
    with pytest.raises(FeatoptError) as error:
        site_of(hook)
    assert_one_sentence(error)


# ----------------------------------------------------------------------------------------- bad input
def _saelens_copy(tmp_path, arch="standard") -> Path:
    return Path(shutil.copytree(FIXTURES / "saelens" / arch, tmp_path / "sae"))


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, file: str, change) -> None:
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file))


BAD = {
    "missing folder": lambda t: t / "nowhere",
    "empty folder": lambda t: (t / "empty").mkdir() or t / "empty",
    "a plain file": lambda t: (t / "f.bin").write_bytes(b"x") and t / "f.bin",
    "cfg not json": lambda t: (_saelens_copy(t) / "cfg.json").write_text("{not json") and t / "sae",
    "cfg a list": lambda t: (_saelens_copy(t) / "cfg.json").write_text("[1, 2]") and t / "sae",
    "weights truncated": lambda t: (_saelens_copy(t) / "sae_weights.safetensors").write_bytes(
        (FIXTURES / "saelens/standard/sae_weights.safetensors").read_bytes()[:100]) and t / "sae",
    "weights garbage": lambda t: (_saelens_copy(t) / "sae_weights.safetensors").write_bytes(b"\x00" * 64) and t / "sae",
    "unknown architecture": lambda t: _edit_cfg(_saelens_copy(t), architecture="gated") or t / "sae",
    "d_in not int": lambda t: _edit_cfg(_saelens_copy(t), d_in="16") or t / "sae",
    "d_in wrong": lambda t: _edit_cfg(_saelens_copy(t), d_in=15) or t / "sae",
    "topk without k": lambda t: _edit_cfg(_saelens_copy(t), architecture="topk") or t / "sae",
    "normalized activations": lambda t: _edit_cfg(_saelens_copy(t), normalize_activations="expected_average_only_in") or t / "sae",
    "rescaled topk": lambda t: _edit_cfg(_saelens_copy(t, "topk"), rescale_acts_by_decoder_norm=True) or t / "sae",
    "wrong shape": lambda t: _edit_tensors(_saelens_copy(t), "sae_weights.safetensors",
                                           lambda d: d.update(W_dec=d["W_dec"].T.contiguous())) or t / "sae",
    "missing tensor": lambda t: _edit_tensors(_saelens_copy(t), "sae_weights.safetensors", lambda d: d.pop("b_enc")) or t / "sae",
    "extra tensor": lambda t: _edit_tensors(_saelens_copy(t), "sae_weights.safetensors",
                                            lambda d: d.update(W_skip=torch.zeros(16, 16))) or t / "sae",
    "jumprelu without threshold": lambda t: _edit_tensors(_saelens_copy(t, "jumprelu"), "sae_weights.safetensors",
                                                          lambda d: d.pop("threshold")) or t / "sae",
    "sparsify groupmax": lambda t: _edit_cfg(Path(shutil.copytree(SPARSIFY / "layers.1.mlp", t / "layers.1")),
                                             activation="groupmax") or t / "layers.1",
    "sparsify attention transcoder": lambda t: _edit_cfg(Path(shutil.copytree(SPARSIFY / "layers.1.mlp", t / "layers.1.self_attn")),
                                                         transcode=True) or t / "layers.1.self_attn",
    "sparsify missing bias": lambda t: _edit_tensors(Path(shutil.copytree(SPARSIFY / "layers.1.mlp", t / "layers.1")),
                                                     "sae.safetensors", lambda d: d.pop("encoder.bias")) or t / "layers.1",
    "npz garbage": lambda t: (t / "g").mkdir() or (t / "g" / "params.npz").write_bytes(b"PK\x03\x04junk") and t / "g",
    "npz wrong shape": lambda t: write_npz(t / "g", {**gemma_params(), "b_dec": np.zeros(7, np.float32)}).parent,
    "npz no W_enc": lambda t: write_npz(t / "g", {"b_enc": np.zeros(3, np.float32)}).parent,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_one_sentence(tmp_path, case):
    path = BAD[case](tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(FeatoptError) as error:
        load_sae(path, hook_name="blocks.0.hook_resid_post" if case.startswith("npz") else None)
    assert_one_sentence(error)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # loading writes nothing


def test_saelens_rescale_flag_with_unit_decoder_rows_loads_as_a_no_op(tmp_path):
    # sae-lens saves topk SAEs with the decoder norms folded in (unit rows) but keeps the flag.
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.resid_post"))
    sae.init_weights(torch.Generator().manual_seed(0))  # unit-norm decoder rows
    folder = save_sae(sae, tmp_path / "sae")
    _edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_sae(folder).encode(x), sae.encode(x))
