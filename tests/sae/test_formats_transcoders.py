"""SAE files of the later architectures and of transcoders, through committed fixtures written by
the real sae-lens and sparsify (tests/sae/fixtures, see make_fixtures.py): BatchTopK and Matryoshka
(which sae-lens saves for inference as "jumprelu" with metadata.training_architecture), sae-lens'
four transcoders (d_out=12 != d_in, some with a skip connection), featopt's own topk transcoder
(which sae-lens cannot load) and sparsify's skip transcoder. The first three architectures are in
test_formats.py. No peer library is needed here: the expected numbers are the libraries' own."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featopt.models.sae.formats import load_sae, save_sae, site_of
from tests.sae.fixtures.make_featopt_saved import FIXTURES as FEATOPT_FIXTURES
from tests.sae.fixtures.make_featopt_saved import SAELENS_UNREADABLE, fixture_sae

FIXTURES = Path(__file__).parent / "fixtures"
NEW = [name for name in FEATOPT_FIXTURES if name not in ("relu", "topk", "jumprelu")]
TRANSCODER_IN, TRANSCODER_OUT = "blocks.1.mlp_in", "blocks.1.mlp_out"


def assert_outputs(sae, recorded: dict[str, torch.Tensor]) -> None:
    """featopt's encode, forward and decode give the recorded numbers, which are not vacuous."""
    x, z = recorded["x"], recorded["latents"]
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(sae.encode(x).detach(), z, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x).detach(), recorded["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.decode(z).detach(), recorded["reconstruction"], atol=1e-5, rtol=0)
    if sae.cfg.skip:  # the skip connection is in the forward pass, not in decode
        assert not torch.allclose(recorded["output"], recorded["reconstruction"], atol=1e-3)
        torch.testing.assert_close(recorded["output"] - recorded["reconstruction"], x @ sae.W_skip.detach().T, atol=1e-5, rtol=0)


def cfg_of(folder: Path) -> dict:
    return json.loads((folder / "cfg.json").read_text())


def layout(folder: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in load_file(str(folder / "sae_weights.safetensors")).items()}


# ----------------------------------------------------------------------------------------- sae-lens' files in featopt
# sae-lens folder: (featopt architecture, k, matryoshka widths, skip connection, transcoder)
SAELENS = {
    "batchtopk": ("batchtopk", 4, None, False, False),
    "matryoshka_batchtopk": ("matryoshka", 4, (8, 24, 48), False, False),
    "transcoder": ("relu", None, None, False, True),
    "skip_transcoder": ("relu", None, None, True, True),
    "jumprelu_transcoder": ("jumprelu", None, None, False, True),
    "jumprelu_skip_transcoder": ("jumprelu", None, None, True, True),
}


@pytest.mark.parametrize("lib_arch", sorted(SAELENS))
def test_saelens_files_load_as_the_right_featopt_sae_and_match_saelens_outputs(lib_arch):
    folder = FIXTURES / "saelens" / lib_arch
    arch, k, widths, skip, transcoder = SAELENS[lib_arch]
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.matryoshka, sae.cfg.skip) == (arch, k, widths, skip)
    assert sae.cfg.model_name == "tiny-test-model" and sae.is_transcoder == transcoder
    if transcoder:
        assert site_of(sae.cfg.hook_name) == TRANSCODER_IN and site_of(sae.cfg.target_hook_name) == TRANSCODER_OUT
        assert (sae.d_in, sae.d_out, sae.cfg.apply_b_dec_to_input) == (16, 12, False)
        assert tuple(sae.W_dec.shape) == (48, 12) and (tuple(sae.W_skip.shape) == (12, 16) if skip else not hasattr(sae, "W_skip"))
    else:
        assert sae.d_out == 16 and sae.cfg.apply_b_dec_to_input and sae.cfg.target_hook_name == ""
    if arch in ("batchtopk", "matryoshka"):  # the threshold sae-lens learned, one value for every latent
        assert cfg_of(folder)["metadata"]["training_architecture"] == lib_arch
        assert float(sae.threshold.min()) == float(sae.threshold.max()) > 0
    assert_outputs(sae, load_file(str(folder / "expected.safetensors")))


@pytest.mark.parametrize("lib_arch", sorted(SAELENS))
def test_saelens_files_saved_again_by_featopt_keep_their_names_and_numbers(tmp_path, lib_arch):
    folder = FIXTURES / "saelens" / lib_arch
    sae = load_sae(folder)
    again = load_sae(save_sae(sae, tmp_path / "sae"))
    assert asdict(again.cfg) == asdict(sae.cfg)
    assert layout(tmp_path / "sae") == layout(folder)
    theirs, ours = cfg_of(folder), cfg_of(tmp_path / "sae")
    for key in ("architecture", "d_out", "apply_b_dec_to_input"):
        assert ours.get(key) == theirs.get(key), key
    for key in ("hook_name", "hook_name_out", "training_architecture"):
        assert ours["metadata"].get(key) == theirs["metadata"].get(key), key
    assert_outputs(again, load_file(str(folder / "expected.safetensors")))


# ----------------------------------------------------------------------------------------- featopt's files in sae-lens
@pytest.mark.parametrize("name", NEW)
def test_featopt_saved_fixture_is_what_save_sae_writes_and_saelens_reads_it_alike(tmp_path, name):
    committed = FIXTURES / "featopt_saved" / name
    out = save_sae(fixture_sae(name), tmp_path / name)
    fresh, old = load_file(str(out / "sae_weights.safetensors")), load_file(str(committed / "sae_weights.safetensors"))
    assert fresh.keys() == old.keys()
    for tensor in fresh:
        assert fresh[tensor].dtype == old[tensor].dtype and torch.equal(fresh[tensor], old[tensor]), tensor
    assert cfg_of(out) == cfg_of(committed)
    sae = load_sae(committed)
    assert asdict(sae.cfg) == asdict(fixture_sae(name).cfg)
    assert sae.content_hash() == fixture_sae(name).content_hash()
    recorded = committed / "saelens_outputs.safetensors"
    # sae-lens' own SAE.load_from_disk read every committed folder it can and recorded its outputs there
    assert recorded.exists() == (name not in SAELENS_UNREADABLE)
    if recorded.exists():
        assert_outputs(sae, load_file(str(recorded)))


def test_featopt_topk_transcoder_round_trips_in_featopt_only():
    committed = FIXTURES / "featopt_saved" / "topk_transcoder"
    cfg = cfg_of(committed)
    assert (cfg["architecture"], cfg["k"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == ("topk_transcoder", 4, 12, False)
    sae, built = load_sae(committed), fixture_sae("topk_transcoder")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name, sae.cfg.target_hook_name) == (
        "topk", 4, TRANSCODER_IN, TRANSCODER_OUT)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1234))
    z = sae.encode(x)
    assert ((z != 0).sum(-1) <= 4).all() and (z != 0).any()
    torch.testing.assert_close(z, built.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(sae(x), built(x), atol=0, rtol=0)
    assert sae(x).shape == (8, 12)


# featopt fixture: (cfg.json architecture, training_architecture, its details, the sae-lens fixture of the same kind)
FEATOPT_CFG = {
    "batchtopk": ("jumprelu", "batchtopk", {"k": 4}, "batchtopk"),
    "matryoshka": ("jumprelu", "matryoshka_batchtopk", {"k": 4, "matryoshka_widths": [8, 24, 48]}, "matryoshka_batchtopk"),
    "transcoder": ("transcoder", None, None, "transcoder"),
    "skip_transcoder": ("skip_transcoder", None, None, "skip_transcoder"),
    "jumprelu_skip_transcoder": ("jumprelu_skip_transcoder", None, None, "jumprelu_skip_transcoder"),
    "batchtopk_transcoder": ("jumprelu_transcoder", "batchtopk", {"k": 4}, "jumprelu_transcoder"),
    "topk_transcoder": ("topk_transcoder", None, None, None),
}


@pytest.mark.parametrize("name", sorted(FEATOPT_CFG))
def test_featopt_cfg_json_says_what_saelens_writes(name):
    folder = FIXTURES / "featopt_saved" / name
    arch, trained, details, peer = FEATOPT_CFG[name]
    cfg, transcoder = cfg_of(folder), "transcoder" in name
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none"
    assert cfg["metadata"].get("training_architecture") == trained
    assert cfg["metadata"].get("training_architecture_details") == details
    assert cfg["apply_b_dec_to_input"] is not transcoder
    if transcoder:  # sae-lens' transcoder fields, hooks in TransformerLens' spelling
        assert cfg["d_out"] == 12
        # The MLP's input after the norm's weight: circuit-tracer's MLP hook, not TransformerLens'
        # ln2.hook_normalized (before the weight), which featopt only reads from its older files.
        assert cfg["metadata"]["hook_name"] == "blocks.1.mlp.hook_in"
        assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert cfg["metadata"]["featopt"]["target_hook_name"] == TRANSCODER_OUT
    else:
        assert "d_out" not in cfg and "hook_name_out" not in cfg["metadata"]
    if peer is not None:  # the same cfg fields and tensor layout as sae-lens' own file of that kind
        theirs = cfg_of(FIXTURES / "saelens" / peer)
        for key in ("architecture", "d_in", "d_sae", "d_out", "apply_b_dec_to_input"):
            assert cfg.get(key) == theirs.get(key), key
        assert cfg["metadata"].get("hook_name_out") == theirs["metadata"].get("hook_name_out")
        assert layout(folder) == layout(FIXTURES / "saelens" / peer)


# ----------------------------------------------------------------------------------------- sparsify
def test_sparsify_skip_transcoder_loads_and_matches_sparsify_outputs():
    folder = FIXTURES / "sparsify" / "transcoder" / "layers.1.mlp"
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_sae, sae.d_out) == ("topk", 4, 16, 48, 16)
    assert (sae.cfg.hook_name, sae.cfg.target_hook_name) == (TRANSCODER_IN, TRANSCODER_OUT)
    assert sae.cfg.skip and not sae.cfg.apply_b_dec_to_input  # sparsify's transcoders do not centre their input
    assert sae.cfg.model_name == "tiny-test-model"
    raw = load_file(str(folder / "sae.safetensors"))
    assert torch.equal(sae.W_skip, raw["W_skip"]) and torch.equal(sae.W_enc, raw["encoder.weight"].T)
    assert_outputs(sae, load_file(str(folder / "expected.safetensors")))
