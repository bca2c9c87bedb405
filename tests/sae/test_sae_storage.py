"""SAE weights loaded without a second copy (featopt/models/sae/storage.py): memory-mapped
safetensors, Gemma Scope's npz converted once into the cache, and a content hash by blocks of rows.
Every expectation is computed independently: safetensors' own `load_file` plus a fresh SAE filled by
`load_state_dict` (the loader featopt had before), numpy's `np.load`, and the old hash spelled out."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import shutil
from dataclasses import asdict
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  registers the reductions ddp_spawn pickles tensors with
from safetensors.torch import load_file, save_file

from featopt.errors import FeatoptError
from featopt.models.sae import model as sae_model
from featopt.models.sae import storage
from featopt.models.sae.formats import load_sae, save_sae
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from featopt.models.sae.training_parts import LossTerms
from tests.sae.test_formats import assert_one_sentence, gemma_params, write_npz

FIXTURES = Path(__file__).parent / "fixtures"
SAELENS = sorted(p.name for p in (FIXTURES / "saelens").iterdir())
SPARSIFY = ["topk", "transcoder"]
MAPS = Path("/proc/self/maps")
needs_maps = pytest.mark.skipif(not MAPS.exists(), reason="reads /proc/self/maps (Linux) to see what backs a tensor")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def backing_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds `tensor`'s memory (None: anonymous memory), from /proc/self/maps."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(a, 16) for a in fields[0].split("-"))
        if low <= ptr < high:
            name = fields[5] if len(fields) > 5 else ""
            return name if name.startswith("/") else None
    return None


def wide_sae(arch: str = "relu", d_in: int = 32, d_sae: int = 2048, seed: int = 0, **cfg) -> SparseAutoencoder:
    """An SAE with weights over many pages (256 KiB per matrix), random and nonzero."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=8 if "topk" in arch else None,
                                      hook_name="blocks.1.resid_post", **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.5 if p.ndim == 1 else 0))
    return sae


def old_load(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """featopt's loader before storage.py: zero parameters of the full size, filled by a copy."""
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()})
    return sae


def sparsify_tensors(folder: Path) -> dict[str, torch.Tensor]:
    raw = load_file(str(folder / "sae.safetensors"))
    out = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    return out | ({"W_skip": raw["W_skip"]} if "W_skip" in raw else {})


def gemma_file(tmp_path: Path, seed: int = 0, d_in: int = 6, d_sae: int = 10, lower: bool = False) -> Path:
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / f"seed_{seed}"
    return write_npz(folder, gemma_params(seed=seed, d_in=d_in, d_sae=d_sae, lower=lower))


def assert_same_sae(sae: SparseAutoencoder, reference: SparseAutoencoder, exact: bool = True) -> None:
    """Equal weights, and equal latents and outputs on random inputs: bit for bit where both hold
    W_enc in the same layout (`exact`), else up to the rounding of another summation order."""
    assert sae.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert sae.state_dict()[name].dtype == tensor.dtype and torch.equal(sae.state_dict()[name], tensor), name
    x = torch.randn(9, sae.d_in, generator=torch.Generator().manual_seed(5)) + 0.3
    z = reference.encode(x)
    assert (z != 0).any()
    if exact:
        assert torch.equal(sae.encode(x), z) and torch.equal(sae(x), reference(x))
    else:
        torch.testing.assert_close(sae.encode(x), z, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(sae(x), reference(x), atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------- same SAE as the old loader
@pytest.mark.parametrize("name", SAELENS)
def test_saelens_mapped_load_equals_the_whole_read(name):
    folder = FIXTURES / "saelens" / name
    sae = load_sae(folder)
    assert_same_sae(sae, old_load(sae.cfg, load_file(str(folder / "sae_weights.safetensors"))))
    assert_same_sae(load_sae(folder, mmap=False), sae)


@pytest.mark.parametrize("name", SPARSIFY)
def test_sparsify_mapped_load_equals_the_whole_read(name):
    folder = FIXTURES / "sparsify" / name / "layers.1.mlp"
    sae = load_sae(folder)
    assert not sae.W_enc.is_contiguous()  # the file's encoder.weight, transposed as a view, not copied
    # the old loader copied W_enc into [d_in, d_sae] order: the matmul sums in another order
    assert_same_sae(sae, old_load(sae.cfg, sparsify_tensors(folder)), exact=False)
    assert_same_sae(load_sae(folder, mmap=False), sae)


@pytest.mark.parametrize("lower", [False, True])
def test_gemma_scope_mapped_load_equals_the_whole_read(tmp_path, lower):
    file = gemma_file(tmp_path, lower=lower)
    sae = load_sae(file)
    with np.load(file) as data:
        arrays = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(data[k]) for k in data.files}
    assert_same_sae(sae, old_load(sae.cfg, arrays))
    assert_same_sae(load_sae(file, mmap=False), sae)


# ----------------------------------------------------------------------------------------- the parameters are the file
@needs_maps
def test_mapped_parameters_are_the_file_and_the_old_loader_copies(tmp_path):
    folder = save_sae(wide_sae("jumprelu"), tmp_path / "sae")
    weights = os.path.realpath(folder / "sae_weights.safetensors")
    sae = load_sae(folder)
    for name, p in sae.named_parameters():
        assert backing_file(p) == weights, name
        assert p.untyped_storage().nbytes() == p.nbytes  # a storage of its own bytes, not of the whole file
    old = old_load(sae.cfg, load_file(weights))  # the assertion above tells the loaders apart
    assert all(backing_file(p) is None for p in old.parameters())
    assert all(backing_file(p) is None for p in load_sae(folder, mmap=False).parameters())


@needs_maps
def test_sparsify_and_gemma_scope_parameters_are_mapped(tmp_path, cache):
    folder = FIXTURES / "sparsify" / "transcoder" / "layers.1.mlp"
    sae = load_sae(folder)
    assert {backing_file(p) for p in sae.parameters()} == {os.path.realpath(folder / "sae.safetensors")}
    gemma = load_sae(gemma_file(tmp_path))
    [converted] = (cache / "sae").glob("npz-*/params.safetensors")
    assert {backing_file(p) for p in gemma.parameters()} == {os.path.realpath(converted)}


@needs_maps
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_another_dtype_is_the_cast_of_the_whole_read(tmp_path, dtype):
    folder = save_sae(wide_sae("topk"), tmp_path / "sae")
    whole = load_file(str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder, dtype=dtype)
    assert sae.cfg.dtype == "float32"
    for name, p in sae.named_parameters():
        assert p.dtype == dtype and torch.equal(p.detach(), whole[name].to(dtype)), name
        assert backing_file(p) is None  # converted: memory of its own
    assert_same_sae(sae, old_load(sae.cfg, whole).to(dtype))


def test_a_bfloat16_file_maps_as_bfloat16_and_casts_to_float32(tmp_path):
    folder = save_sae(wide_sae("relu").to(torch.bfloat16), tmp_path / "sae")
    whole = load_file(str(folder / "sae_weights.safetensors"))
    same = load_sae(folder, dtype=torch.bfloat16)
    assert same.cfg.dtype == "bfloat16" and all(torch.equal(same.state_dict()[k], v) for k, v in whole.items())
    wide = load_sae(folder)
    assert wide.W_enc.dtype == torch.float32 and all(torch.equal(wide.state_dict()[k], v.float()) for k, v in whole.items())


@pytest.mark.parametrize("block", [1 << 24, 20000])
def test_released_pages_read_the_file_again(tmp_path, monkeypatch, block):
    # cast_each drops the pages of each converted block; any view still held reads the file again.
    monkeypatch.setattr(storage, "_BLOCK", block)  # 20000 bytes: one 16 KiB row a block
    file = tmp_path / "t.safetensors"
    save_file({"big": torch.randn(64, 4096), "tall": torch.randn(4096, 48), "small": torch.randn(7)}, str(file))
    whole = load_file(str(file))
    tensors, release = storage.read_safetensors(file)
    kept = dict(tensors)
    tensors["tall"] = tensors["tall"].T  # as sparsify's encoder: converted in the file's row order
    cast = storage.cast_each(tensors, torch.float64, release)
    assert tensors == {} and cast["tall"].stride() == (1, 48) and torch.equal(cast["tall"], whole["tall"].T.double())
    assert all(torch.equal(cast[k], whole[k].double()) for k in ("big", "small"))
    assert all(torch.equal(kept[k], whole[k]) for k in whole)


# ----------------------------------------------------------------------------------------- Gemma Scope's cache
def test_gemma_scope_second_load_reads_the_cache_not_the_arrays(tmp_path, cache, monkeypatch):
    file = gemma_file(tmp_path, d_in=24, d_sae=300)
    calls = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = load_sae(file)
    assert calls == []  # np.savez's members are streamed into the cache, never loaded whole
    [converted] = (cache / "sae").glob("npz-*/params.safetensors")
    on_disk = load_file(str(converted))
    params = gemma_params(d_in=24, d_sae=300)
    assert on_disk.keys() == params.keys() and all(np.array_equal(on_disk[k].numpy(), v) for k, v in params.items())
    # Other numbers of the same size under the same mtime: a load that read the arrays would see them.
    stat = file.stat()
    np.savez(file, **gemma_params(seed=7, d_in=24, d_sae=300))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size
    second = load_sae(file)
    assert calls == []
    assert_same_sae(second, first)


@pytest.mark.parametrize("layout", ["compressed", "fortran", "big_endian", "float16"])
def test_gemma_scope_npz_of_other_layouts_converts_to_the_same_numbers(tmp_path, layout):
    params = gemma_params(d_in=24, d_sae=300)
    stored = dict(params)
    if layout == "fortran":
        stored = {k: np.asfortranarray(v) for k, v in params.items()}
    elif layout == "big_endian":
        stored = {k: v.astype(">f4") for k, v in params.items()}
    elif layout == "float16":
        stored = params = {k: v.astype(np.float16) for k, v in params.items()}
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "l0"
    folder.mkdir(parents=True)
    (np.savez_compressed if layout == "compressed" else np.savez)(folder / "params.npz", **stored)
    sae = load_sae(folder / "params.npz", dtype=torch.float16 if layout == "float16" else torch.float32)
    for name, array in params.items():
        assert np.array_equal(getattr(sae, name).detach().numpy(), array), name


def test_gemma_scope_changed_npz_rebuilds_the_cache_and_drops_the_old(tmp_path, cache):
    file = gemma_file(tmp_path)
    load_sae(file)
    old_entry = sorted((cache / "sae").glob("npz-*"))
    stat = file.stat()
    np.savez(file, **gemma_params(seed=1))  # same shapes, same size: the new mtime tells it apart
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    sae = load_sae(file)
    for name, array in gemma_params(seed=1).items():
        assert np.array_equal(getattr(sae, name).detach().numpy(), array), name
    entries = sorted((cache / "sae").glob("npz-*"))
    assert len(entries) == 1 and entries != old_entry


def test_gemma_scope_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, cache):
    file = gemma_file(tmp_path)
    load_sae(file)
    [converted] = (cache / "sae").glob("npz-*/params.safetensors")
    data = bytearray(converted.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # an edited value: the entry's checksum no longer matches
    converted.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        sae = load_sae(file)
    assert np.array_equal(sae.threshold.detach().numpy(), gemma_params()["threshold"])


def test_gemma_scope_unwritable_cache_reads_the_npz_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "not_a_folder"))
    file = gemma_file(tmp_path)
    with pytest.warns(UserWarning, match="without a cache"):
        sae = load_sae(file)
    assert np.array_equal(sae.W_dec.detach().numpy(), gemma_params()["W_dec"])


def test_gemma_scope_whole_read_and_bad_npz_write_no_cache(tmp_path, cache):
    load_sae(gemma_file(tmp_path), mmap=False)
    bad = write_npz(tmp_path / "bad", {**gemma_params(), "b_dec": np.zeros(7, np.float32)})
    with pytest.raises(FeatoptError):
        load_sae(bad, hook_name="blocks.0.hook_resid_post")
    assert not (cache / "sae").exists() or not any((cache / "sae").iterdir())


# ----------------------------------------------------------------------------------------- using a mapped SAE
@pytest.mark.parametrize("source", ["saelens_jumprelu", "sparsify_transcoder"])
def test_a_training_step_changes_the_parameters_never_the_file(tmp_path, source):
    if source == "saelens_jumprelu":
        folder, file = save_sae(wide_sae("jumprelu"), tmp_path / "sae"), "sae_weights.safetensors"
    else:
        folder = Path(shutil.copytree(FIXTURES / "sparsify" / "transcoder" / "layers.1.mlp", tmp_path / "layers.1.mlp"))
        file = "sae.safetensors"
    before = (folder / file).read_bytes()
    sae = load_sae(folder)
    start = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(3))
    y = torch.randn(64, sae.d_out, generator=torch.Generator().manual_seed(4)) if sae.is_transcoder else None
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    loss, _ = sae.training_loss(x, (x if y is None else y).var(0).sum() * 64, LossTerms(l0_coef=1e-3, auxk_alpha=0.1), y)
    loss.backward()
    opt.step()
    sae.after_step()
    moved = [k for k, v in sae.state_dict().items() if not torch.equal(v, start[k])]
    assert "W_enc" in moved and "W_dec" in moved
    assert (folder / file).read_bytes() == before
    again = load_sae(folder).state_dict()
    assert again.keys() == start.keys() and all(torch.equal(again[k], v) for k, v in start.items())


def test_mapped_sae_pickles_by_value_and_moves(tmp_path):
    folder = save_sae(wide_sae("topk"), tmp_path / "sae")
    sae = load_sae(folder)
    whole = old_load(sae.cfg, load_file(str(folder / "sae_weights.safetensors")))
    data = pickle.dumps(sae)
    weights = sum(p.nbytes for p in sae.parameters())
    assert len(data) < weights + (64 << 10)  # each tensor's own bytes, not the whole file per tensor
    shutil.rmtree(folder)  # the copy needs nothing of the file
    assert_same_sae(pickle.loads(data), sae)
    assert_same_sae(copy.deepcopy(sae), sae)
    ForkingPickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(sae)  # as ddp_spawn sends it (shared memory)
    assert_same_sae(sae.to(torch.float64), whole.to(torch.float64))


# ----------------------------------------------------------------------------------------- the content hash
def old_hash(sae: SparseAutoencoder) -> str:
    """content_hash as featopt computed it before: each tensor whole, as float32 bytes."""
    doc = {k: v for k, v in asdict(sae.cfg).items()
           if not (k in sae_model._LATER_FIELDS and v == sae_model._LATER_FIELDS[k])}
    if doc["d_out"] == doc["d_in"]:
        del doc["d_out"]
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("block", [1 << 24, 100, 4])
def test_content_hash_by_blocks_of_rows_is_the_old_hash(tmp_path, monkeypatch, block):
    monkeypatch.setattr(sae_model, "_HASH_BLOCK", block)  # 100 bytes: blocks of rows; 4: one value a row
    saes = [wide_sae("relu"), wide_sae("jumprelu").to(torch.bfloat16), wide_sae("topk", d_out=12, skip=True, apply_b_dec_to_input=False,
                                                                            target_hook_name="blocks.1.mlp_out"),
            load_sae(save_sae(wide_sae("batchtopk"), tmp_path / "sae")), load_sae(FIXTURES / "sparsify" / "topk" / "layers.1.mlp"),
            load_sae(gemma_file(tmp_path))]
    for sae in saes:
        assert sae.content_hash() == old_hash(sae)


# ----------------------------------------------------------------------------------------- garbled files
def raw_file(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned, as safetensors writes it
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


GARBLED = {
    "header beyond the file": lambda p: raw_file(p, {}, length=10**6),
    "header a list": lambda p: raw_file(p, [1, 2]),
    "unknown dtype": lambda p: raw_file(p, {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative shape": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "bytes not the shape's": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "past the end": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "overlapping": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
}


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_garbled_safetensors_raise_one_sentence(tmp_path, case):
    folder = Path(shutil.copytree(FIXTURES / "saelens" / "standard", tmp_path / "sae"))
    GARBLED[case](folder / "sae_weights.safetensors")
    with pytest.raises(FeatoptError) as error:
        load_sae(folder)
    assert "sae_weights.safetensors is not a readable safetensors file" in assert_one_sentence(error)


def test_an_unaligned_tensor_is_read_into_aligned_memory(tmp_path):
    values = np.array([1.5, -2.25, 3.0], np.float32)
    file = raw_file(tmp_path / "odd.safetensors", {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                                                   "b": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]}},
                    bytes([7, 8, 9]) + values.tobytes())
    tensors, _ = storage.read_safetensors(file)
    assert tensors["b"].data_ptr() % 4 == 0 and np.array_equal(tensors["b"].numpy(), values)
    assert tensors["a"].tolist() == [7, 8, 9]
