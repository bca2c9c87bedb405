"""The SAEs of one model that feature flow works across, and the names of their features.

Document 003 names a feature `layer/module/index`: `12/res/4230` is latent 4230 of the SAE on the
residual stream after block 12, `12/mlp/...` and `12/att/...` those of the SAEs on block 12's MLP
and attention outputs. In a Llama- or GPT-style block `resid_post[L] = resid_post[L-1] +
attn_out[L] + mlp_out[L]`, so a feature of `L/res` can come from `L-1/res` (carried by the
residual), `L/mlp` or `L/att`: those are its **predecessor** SAEs.

A transcoder (reading `blocks.L.mlp_in`, writing `blocks.L.mlp_out`) stands in the `L/mlp` role:
its decoder rows are directions the MLP writes, as an `mlp_out` SAE's are, so every comparison of
decoder rows holds; its latents are encoded from its input site (:meth:`FlowSet.read_site`) and
edits of them land on its target site (:func:`featopt.interventions.edits.latent_edits`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from featopt.errors import FeatoptError
from featopt.models import Site, parse_site

#: document 003's module names -> featopt's site kinds.
MODULES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}
KIND_TO_MODULE = {kind: module for module, kind in MODULES.items()}
_NODE = re.compile(r"^\s*(\d+)\s*/\s*(res|mlp|att)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Node:
    """One SAE feature: `Node(6, "res", 123)` is `6/res/123`."""

    layer: int
    module: str
    index: int

    @property
    def key(self) -> tuple[int, str]:
        """The SAE it belongs to: `(layer, module)`."""
        return (self.layer, self.module)

    @property
    def site(self) -> Site:
        return key_site(self.key)

    def __str__(self) -> str:
        return f"{self.layer}/{self.module}/{self.index}"


def key_site(key: tuple[int, str]) -> Site:
    """The site an SAE key `(layer, module)` stands for, what its decoder writes: `(6, "mlp")` ->
    `blocks.6.mlp_out` (an SAE reads it too; a transcoder reads :meth:`FlowSet.read_site`)."""
    return Site(key[0], MODULES[key[1]])


def choose_layers(usable: list[int], layers, *, none: str, why) -> list[int]:
    """`layers` (all `usable` when None), each checked to be usable; `none` is the error when
    nothing is usable, `why(layer)` says what a refused layer lacks."""
    if layers is None:
        if not usable:
            raise FeatoptError(none)
        return usable
    layers = sorted({int(layer) for layer in layers})
    for layer in layers:
        if layer not in usable:
            raise FeatoptError(f"{why(layer)}: allowed layers are {usable}.")
    return layers


def parse_node(text: str | Node) -> Node:
    """`"12/res/4230"` -> `Node(12, "res", 4230)`."""
    if isinstance(text, Node):
        return text
    match = _NODE.match(str(text))
    if not match:
        raise FeatoptError(f"feature {text!r} is malformed: write LAYER/MODULE/INDEX with MODULE res, mlp or att, "
                           "like 6/res/123.")
    return Node(int(match[1]), match[2], int(match[3]))


def module_of(site: Site) -> str:
    if site.kind not in KIND_TO_MODULE:
        raise FeatoptError(f"feature flow works on SAEs at resid_post, mlp_out and attn_out sites (and transcoders "
                           f"writing one), not {site.name}: train or load SAEs at those sites.")
    return KIND_TO_MODULE[site.kind]


class FlowSet:
    """SAEs keyed by `(layer, module)` (a transcoder by the site it writes), all of one width: the
    width of the activations they reconstruct, whose decoder rows flow compares.

    `saes`: `{(layer, module): SparseAutoencoder}`; `paths`: where each was loaded from (for records).
    """

    def __init__(self, saes: dict[tuple[int, str], object], paths: dict[tuple[int, str], str] | None = None):
        if not saes:
            raise FeatoptError("no SAE given: feature flow needs SAEs at two or more sites of one model.")
        widths = {key: sae.d_out for key, sae in saes.items()}
        if len(set(widths.values())) > 1:
            listing = ", ".join(f"{layer}/{module}: {w}" for (layer, module), w in sorted(widths.items()))
            raise FeatoptError(f"the SAEs read activations of different widths ({listing}): feature flow compares "
                               "decoder rows, so all SAEs must be of one model and width.")
        self.saes = dict(sorted(saes.items()))
        self.paths = dict(paths or {})
        from featopt.models.sae.attach import site_of

        # where each SAE's latents are encoded from: its own site, or a transcoder's input site
        self.reads = {key: parse_site(site_of(sae)) if sae.is_transcoder else key_site(key)
                      for key, sae in self.saes.items()}

    def read_site(self, key: tuple[int, str]) -> Site:
        """The site SAE `key`'s latents are encoded from (a transcoder's input; else `key_site(key)`)."""
        self[key]
        return self.reads[tuple(key)]

    @classmethod
    def load(cls, paths: str | Iterable[str]) -> "FlowSet":
        """From SAE folders, comma-separated or a list; a folder holding SAE folders (such as the
        output of `featopt sae train` with several sites) stands for all of them."""
        from featopt.models.sae.attach import target_site_of
        from featopt.models.sae.formats import load_sae

        items = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else [str(p).strip() for p in paths]
        items = [p for p in items if p]
        if not items:
            raise FeatoptError("--saes names no SAE folder: give SAE folders, comma-separated, or a folder holding them.")
        folders: list[Path] = []
        for item in items:
            path = Path(item)
            if not path.exists():
                raise FeatoptError(f"SAE folder {item!r} does not exist: give SAE folders or a folder holding them.")
            if path.is_dir() and not any((path / f).exists() for f in ("cfg.json", "config.json", "params.npz")):
                found = sorted(p.parent for p in path.glob("*/cfg.json"))
                if not found:
                    raise FeatoptError(f"{item!r} is neither an SAE folder nor a folder of SAE folders (no cfg.json "
                                       "inside): give SAE folders.")
                folders += found
            else:
                folders.append(path)
        saes, where = {}, {}
        for folder in folders:
            sae = load_sae(folder)
            site = parse_site(target_site_of(sae))  # what it writes: a transcoder's target
            key = (site.layer, module_of(site))
            if key in saes:
                raise FeatoptError(f"two SAEs for {key[0]}/{key[1]} ({where[key]} and {folder}): give one SAE per site.")
            sae.source = str(folder)
            saes[key], where[key] = sae, str(folder)
        return cls(saes, where)

    # ------------------------------------------------------------------ lookups
    def __contains__(self, key: tuple[int, str]) -> bool:
        return tuple(key) in self.saes

    def __getitem__(self, key: tuple[int, str]):
        key = tuple(key)
        if key not in self.saes:
            raise FeatoptError(f"no SAE for {key[0]}/{key[1]}: the SAEs given are at {self.describe_keys()}.")
        return self.saes[key]

    def keys(self) -> list[tuple[int, str]]:
        return list(self.saes)

    def describe_keys(self) -> str:
        return ", ".join(f"{layer}/{module}" for layer, module in self.saes)

    @property
    def d_in(self) -> int:
        return next(iter(self.saes.values())).d_in

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.saes})

    def check_node(self, node: str | Node) -> Node:
        """A node of one of these SAEs, its index in range."""
        node = parse_node(node)
        sae = self[node.key]
        if not 0 <= node.index < sae.d_sae:
            raise FeatoptError(f"feature {node} is out of range: the SAE at {node.layer}/{node.module} has {sae.d_sae} "
                               f"latents (0-{sae.d_sae - 1}).")
        return node

    def predecessors(self, key: tuple[int, str]) -> list[tuple[int, str]]:
        """The SAEs a feature of `key` can come from, those present: for `L/res`, `L-1/res`,
        `L/mlp` and `L/att`; an MLP or attention feature of layer L reads the residual before the
        block, `L-1/res`. A set without any residual SAE (per-layer transcoders alone) has no
        residual to go through, so there an MLP or attention feature's predecessor is the same
        module one layer before, `L-1/mlp` (what it wrote into the residual that `L` reads)."""
        layer, module = key
        if module == "res":
            wanted = [(layer - 1, "res"), (layer, "mlp"), (layer, "att")]
        elif any(m == "res" for _, m in self.saes):
            wanted = [(layer - 1, "res")]
        else:
            wanted = [(layer - 1, module)]
        return [k for k in wanted if k in self.saes]

    def successors(self, key: tuple[int, str]) -> list[tuple[int, str]]:
        """The SAEs `key` is a predecessor of, those present (the inverse of :meth:`predecessors`)."""
        return [k for k in self.saes if key in self.predecessors(k)]

    def check_model(self, adapter) -> None:
        """Every SAE's sites exist in `adapter` with the SAE's widths."""
        for (layer, module), sae in self.saes.items():
            site = key_site((layer, module))
            if layer >= adapter.n_layers:
                raise FeatoptError(f"the SAE at {layer}/{module} reads {site.name}, but model {adapter.name!r} has "
                                   f"{adapter.n_layers} layers (0-{adapter.n_layers - 1}): use SAEs of this model.")
            for where, width in ((self.reads[(layer, module)], sae.d_in), (site, sae.d_out)):
                if adapter.width(where) != width:
                    raise FeatoptError(f"the SAE at {layer}/{module} has {width}-wide activations at {where.name} but "
                                       f"model {adapter.name!r} is {adapter.width(where)} wide there: use SAEs of this "
                                       "model.")

    def describe(self) -> dict:
        return {f"{layer}/{module}": {**self.saes[(layer, module)].describe(), "path": self.paths.get((layer, module))}
                for layer, module in self.saes}
