"""Which sites and sizes a `sae train` run names: `--site` lists and layer ranges, `--target_site`,
and the comma-separated size flags (`--expansion`, `--d_sae`, `--matryoshka`)."""

from __future__ import annotations

import re

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site


def sizes(values: str | int | None, flag: str) -> list[float]:
    """The numbers of a comma-separated flag (`--expansion 1,2,4`), each positive and finite."""
    if values is None:
        return []
    out = []
    for item in str(values).split(","):
        try:
            number = float(item)
        except ValueError:
            raise FeatoptError(f"{flag} {values!r} is malformed: write a number or a comma-separated list, like 4 or 1,2,4,8.") from None
        if not number > 0 or number != number or number == float("inf"):
            raise FeatoptError(f"{flag} must be positive and finite, got {item.strip()!r}.")
        out.append(number)
    return out


def site_list(adapter: ModelAdapter, site: str) -> list[Site]:
    """Sites of a comma-separated list; `blocks.A-B.KIND` is every layer from A to B (inclusive)."""
    names = []
    for item in (s.strip() for s in str(site).split(",") if s.strip()):
        match = re.match(r"^blocks\.(\d+)-(\d+)\.(.+)$", item)
        if match and int(match[1]) > int(match[2]):
            raise FeatoptError(f"site range {item!r} runs backwards: write blocks.A-B.KIND with A <= B.")
        names += [f"blocks.{layer}.{match[3]}" for layer in range(int(match[1]), int(match[2]) + 1)] if match else [item]
    return list(dict.fromkeys(adapter.site(name) for name in names))


def targets(adapter: ModelAdapter, sites: list[Site], target: str | None) -> list[Site | None]:
    """The site each transcoder reconstructs, one per input site (None: SAEs): a kind (`mlp_out`,
    the input's own layer) or as many sites as `--site` gives."""
    if not target:
        return [None] * len(sites)
    if re.match(r"^[a-z_]+$", target.strip()):
        return [adapter.site(target.strip(), site.layer) for site in sites]
    targets = site_list(adapter, target)
    if len(targets) != len(sites):
        raise FeatoptError(f"--target_site names {len(targets)} sites for the {len(sites)} of --site: give one per input "
                           "site, or a kind such as mlp_out (the same layer as each).")
    return targets
