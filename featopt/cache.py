"""Where featopt keeps what is expensive to recompute (converted GGUF models, pseudoinverses, the
compiled C kernel), and how an entry is written and checked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$FEATOPT_CACHE`, default `~/.cache/featopt`."""
    return Path(os.environ.get("FEATOPT_CACHE") or "~/.cache/featopt").expanduser()


# Each entry is a folder: built in a hidden temporary sibling, given a manifest (every file's size
# and sha256) and renamed into place, so a reader sees all of it or none. On read the manifest is
# checked; an entry without one (half-built by a killed process of an older featopt, or edited)
# is moved aside and rebuilt, never used. Two processes filling the same entry at once both build
# it; the first rename wins and the other uses the winner's entry.
MANIFEST = ".featopt-entry.json"
_FULL_HASH = 16 << 20  # files up to this size are hashed whole on every read
_SAMPLE = 1 << 20  # bigger ones (a converted model: 500 MB, 1.4 s of sha256) by their first and last MiB


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_HASH:
            while block := f.read(1 << 22):
                h.update(block)
        else:
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}


def _manifest(folder: Path) -> dict:
    return {name: {"size": p.stat().st_size, "sha256": _digest(p)} for name, p in sorted(_files(folder).items())}


def is_valid(folder: Path) -> bool:
    """Whether `folder` is a complete entry: its manifest lists exactly its files, with their
    sizes and checksums."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        files = _files(folder)
        return bool(listed) and listed.keys() == files.keys() and all(
            files[n].stat().st_size == v["size"] and _digest(files[n]) == v["sha256"] for n, v in listed.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def entry(target: Path, build: Callable[[Path], None]) -> Path:
    """The cache entry `target` (a folder), built by `build(folder)` when missing or invalid.
    `build` writes its files into the empty folder it is given; it may raise, and nothing is left."""
    if is_valid(target):
        return target
    if target.exists():
        warnings.warn(f"featopt: the cache entry {target} is incomplete or corrupt: rebuilding it", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 would make a shared cache private
    try:
        build(tmp)
        document = json.dumps({"files": _manifest(tmp)}, indent=1)
        (tmp / MANIFEST).write_text(document)  # inside the unpublished folder: the rename publishes both
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path) -> None:
    for _ in range(3):
        try:
            os.rename(tmp, target)  # fails when target exists and is not empty
            return
        except OSError:
            if is_valid(target):  # another process won the race: its entry is as good as ours
                return
        # An invalid entry is in the way: move it aside (atomic; a racing process may do it first).
        stale = target.parent / f".{target.name}.{secrets.token_hex(4)}.stale"
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not install the cache entry {target}: it keeps being replaced by another process")
