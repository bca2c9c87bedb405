"""Cache entries (featopt.cache.entry): built once into a temporary sibling and renamed into place,
checked on read, rebuilt when truncated, edited or half there; two real processes filling an empty
cache at once both get the right answer and leave one valid entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from featopt import cache
from featopt.interrupt import Interrupted


def _convert(calls: list, payload: bytes = b"weights " * 1000):
    """A stand-in for a slow conversion: a model file, a config and a nested tokenizer file."""

    def build(folder):
        calls.append(folder)
        (folder / "model.bin").write_bytes(payload)
        (folder / "config.json").write_text('{"layers": 2}')
        (folder / "tok").mkdir()
        (folder / "tok" / "vocab.txt").write_text("a\nb\n")

    return build


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_entry_is_built_once_then_reused(tmp_path):
    calls: list = []
    target = tmp_path / "gguf" / "model-1234"
    assert cache.entry(target, _convert(calls)) == target
    assert cache.entry(target, _convert(calls)) == target
    assert len(calls) == 1 and calls[0].parent == target.parent and calls[0] != target  # built beside, renamed
    assert (target / "model.bin").read_bytes() == b"weights " * 1000
    manifest = json.loads((target / cache.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["config.json", "model.bin", "tok/vocab.txt"]
    assert manifest["model.bin"]["size"] == 8000
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes", "file missing", "file added",
                                    "no manifest", "empty folder"])
def test_a_damaged_entry_is_rebuilt_never_used(tmp_path, damage):
    calls: list = []
    target = tmp_path / "model-1234"
    cache.entry(target, _convert(calls))
    model = target / "model.bin"
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "same size, other bytes":
        model.write_bytes(b"x" * 8000)
    elif damage == "file missing":
        (target / "tok" / "vocab.txt").unlink()
    elif damage == "file added":
        (target / "half.tmp").write_text("")
    elif damage == "no manifest":
        (target / cache.MANIFEST).unlink()
    else:
        for p in sorted(target.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    assert not cache.is_valid(target)
    with pytest.warns(UserWarning, match="incomplete or corrupt: rebuilding"):
        cache.entry(target, _convert(calls))
    assert len(calls) == 2 and cache.is_valid(target)
    assert model.read_bytes() == b"weights " * 1000 and (target / "tok" / "vocab.txt").read_text() == "a\nb\n"
    assert sorted(p.name for p in target.rglob("*")) == sorted([cache.MANIFEST, "config.json", "model.bin", "tok",
                                                                 "vocab.txt"])
    assert _leftovers(tmp_path) == []


def test_big_files_are_checked_by_size_and_their_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_FULL_HASH", 1000)
    monkeypatch.setattr(cache, "_SAMPLE", 100)
    target = tmp_path / "big"
    cache.entry(target, _convert([]))
    model = target / "model.bin"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    assert not cache.is_valid(target)
    model.write_bytes(b"weights " * 1000 + b"!")
    assert not cache.is_valid(target)


@pytest.mark.parametrize("error", [RuntimeError("conversion failed"), Interrupted(15)])
def test_a_failed_or_interrupted_build_leaves_nothing(tmp_path, error):
    def build(folder):
        (folder / "model.bin").write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        cache.entry(tmp_path / "model-1234", build)
    assert list(tmp_path.iterdir()) == []


def test_an_entry_another_process_installed_first_is_used(tmp_path):
    target = tmp_path / "model-1234"

    def build(folder):  # while this one builds, another process installs its own entry
        cache.entry(target, _convert([], b"theirs"))
        _convert([], b"ours")(folder)

    cache.entry(target, build)
    assert (target / "model.bin").read_bytes() == b"theirs" and cache.is_valid(target)
    assert _leftovers(tmp_path) == []


WORKER = textwrap.dedent("""
    import sys, torch
    from featopt.gradient import decoding
    from featopt.weights import native

    E = torch.randn(3000, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    embeds = torch.randn(7, 24, generator=torch.Generator().manual_seed(6))
    ids = decoding.pinv_decoder(E).decode(embeds)
    # Independent reference: argmax of the minimum-norm solution a of E^T a = e.
    reference = (torch.linalg.pinv(E.double().T) @ embeds.double().T).argmax(dim=0)
    assert torch.equal(ids, reference), (ids, reference)

    fn = native.kernel()
    assert fn is not None, "no compiled kernel"
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    reducer = native.TileReducer(fn, 3, 4)
    reducer.update(logits[:, :250].contiguous(), 0)
    reducer.update(logits[:, 250:].contiguous(), 250)
    values, top = reducer.top()
    assert torch.equal(top.sort(dim=1).values, logits.topk(4, dim=1).indices.sort(dim=1).values)
    print("ok")
""")


@pytest.mark.skipif(not any(os.access(os.path.join(p, "cc"), os.X_OK) for p in os.environ.get("PATH", "").split(":")),
                    reason="no C compiler (cc) for the native kernel")
def test_two_processes_fill_an_empty_cache_at_once(tmp_path):
    env = {**os.environ, "FEATOPT_CACHE": str(tmp_path / "cache"), "FEATOPT_NATIVE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    for kind in ("pinv", "native"):
        folder = tmp_path / "cache" / kind
        entries = [p for p in folder.iterdir() if p.is_dir()]
        assert len(entries) == 1 and cache.is_valid(entries[0]), kind
        assert _leftovers(folder) == [], kind
    assert len(list((tmp_path / "cache" / "pinv").iterdir())) == 1
