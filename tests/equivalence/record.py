"""Regenerate every fixture of the refactor-equivalence suite from the current code.

    python -m tests.equivalence.record                 # rewrite tests/equivalence/fixtures/
    python -m tests.equivalence.record --out DIR       # write them into DIR instead (to diff)
    python tests/equivalence/record.py --keep ROOT     # keep the runs' output folders in ROOT

Run it only from code whose outputs are the reference (before a refactor, not after one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.equivalence` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.equivalence"

from .commands import COMMANDS  # noqa: E402
from .fixture import FIXTURES, build, write  # noqa: E402
from .runner import run_suite  # noqa: E402


def record(out: Path, root: Path) -> list[Path]:
    runs = run_suite(root, log=lambda line: print(line, file=sys.stderr, flush=True))
    written = [write(build(runs[c.name], root), out) for c in COMMANDS]
    # A fixture left over from a command that is no longer in the suite would never be checked.
    for stale in set(out.glob("*.json")) - set(written):
        stale.unlink()
        print(f"removed {stale}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder (default: the committed one)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this new folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.keep:
        written = record(args.out, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="featopt-equivalence-") as tmp:
            written = record(args.out, Path(tmp).resolve())
    size = sum(p.stat().st_size for p in written)
    print(f"{len(written)} fixtures, {size / 1024:.0f} KiB, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
