"""Writing files and folders atomically: a reader sees the old one or the whole new one, never half.

Each file is written to a temporary name in the same folder and renamed into place; a folder is
built in a hidden sibling and renamed into place. Both keep the usual permissions (mkstemp's and
mkdtemp's owner-only modes would make results private to the user who ran featopt).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place: a reader sees the
    old file or the whole new one, never half of it. The file gets the usual permissions (mkstemp's
    0600 would make results private to the user who ran featopt)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Build a folder in a hidden sibling (yielded) and rename it into `out` at the end; an old
    `out` is replaced whole. On any error the sibling is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{secrets.token_hex(4)}.{end}" for end in ("tmp", "old"))
    tmp.mkdir()  # not mkdtemp: its 0700 would make the saved folder private
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
        else:  # a folder cannot be renamed over a non-empty one: move the old aside, then drop it
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
