"""A cheap guard: featopt's own source never loads pickles or runs a model's code by default."""

from __future__ import annotations

import re
from pathlib import Path

import featopt

SOURCE = sorted(Path(featopt.__file__).parent.rglob("*.py"))


def _calls(text: str, name: str) -> list[str]:
    """Every `name(...)` call's argument text, brackets balanced (calls may span lines)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[match.end():i - 1])
    return calls


def test_the_guard_sees_what_it_looks_for():
    assert _calls("x = torch.load(\n  f, map_location=(1, 2))\n", "torch.load") == ["\n  f, map_location=(1, 2)"]


def test_every_torch_load_is_weights_only_and_no_remote_code_is_hard_wired():
    assert len(SOURCE) > 20
    bad = []
    for path in SOURCE:
        text = path.read_text(encoding="utf-8")
        for args in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                bad.append(f"{path.name}: torch.load({' '.join(args.split())}) without weights_only=True")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            bad.append(f"{path.name}: trust_remote_code=True written in the source (it must come from the flag)")
    assert not bad, bad
