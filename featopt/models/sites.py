"""Site names: where in the model an activation is read or written.

A site is a block index and a kind. Names are stable strings, `blocks.{l}.{kind}`, with the
kinds below; TransformerLens spellings (`blocks.2.hook_resid_post`, `blocks.2.mlp.hook_post`)
are accepted and mean the same place. Layers are 0-indexed as in Hugging Face and
TransformerLens (the source documents' "Block 1" is layer 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featopt.errors import FeatoptError

#: kind -> what it holds, in the order a block computes them.
SITE_KINDS = {
    "resid_pre": "the block's input (the residual stream before it)",
    "attn_out": "the attention module's output, before it is added to the residual",
    "mlp_in": "the MLP's input, after the pre-MLP norm (what a transcoder reads)",
    "mlp_hidden": "the MLP's neurons after the activation (input of the down-projection)",
    "mlp_out": "the MLP module's output, before it is added to the residual",
    "resid_post": "the block's output (before the final norm, also for the last block)",
}

#: The model's output: the next-token logits (the last block's output through the final norm and the
#: LM head, as the Hugging Face forward computes them). Named `logits` alone; it is read at the end.
LOGITS = "logits"

_TL_ALIASES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    # Read as the MLP's input in files featopt wrote before it named it `mlp.hook_in`. TransformerLens'
    # own `ln2.hook_normalized` is before the norm's weight (its `hook_mlp_in` before the whole norm).
    "ln2.hook_normalized": "mlp_in",
    # The MLP's input after the norm and its weight: circuit-tracer's name (its MLP wrapper's hook),
    # which featopt writes (the last alias of a kind is the name written).
    "mlp.hook_in": "mlp_in",
    "mlp.hook_post": "mlp_hidden",
}

_SITE_RE = re.compile(r"^blocks\.(\d+)\.([a-z0-9_.]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One place in one block: `Site(3, "resid_post")` is `blocks.3.resid_post`."""

    layer: int
    kind: str = "resid_post"

    @property
    def name(self) -> str:
        return LOGITS if self.kind == LOGITS else f"blocks.{self.layer}.{self.kind}"

    @property
    def tl_name(self) -> str:
        """The TransformerLens (and SAELens) hook name of the same place."""
        if self.kind == LOGITS:
            return "unembed.hook_out"
        hook = {v: k for k, v in _TL_ALIASES.items()}[self.kind]
        return f"blocks.{self.layer}.{hook}"

    def __str__(self) -> str:
        return self.name


def parse_site(site: str | Site | None, layer: int | None = None, *, n_layers: int | None = None) -> Site:
    """Read a site from a full name (`blocks.2.mlp_out`), or a kind plus `layer`.

    `parse_site("mlp_out", layer=2)`, `parse_site("blocks.2.hook_mlp_out")` and
    `parse_site(None, 2)` (the default kind, `resid_post`) are all valid. With `n_layers`,
    the layer is checked to exist.
    """
    if isinstance(site, Site):
        parsed = site
    elif isinstance(site, str) and site.strip() in (LOGITS, "unembed.hook_out"):
        if n_layers is None:
            raise FeatoptError("the logits site needs the model's number of layers: read it through the model's adapter.")
        return Site(n_layers - 1, LOGITS)
    else:
        text = (site or "resid_post").strip()
        match = _SITE_RE.match(text)
        if match:
            if layer is not None and int(match.group(1)) != layer:
                raise FeatoptError(f"site {text!r} names layer {match.group(1)} but layer {layer} was also given: give one.")
            layer, text = int(match.group(1)), match.group(2)
        kind = _TL_ALIASES.get(text, text)
        if kind not in SITE_KINDS:
            allowed = ", ".join(SITE_KINDS)
            raise FeatoptError(f"unknown site {site!r}: allowed kinds are {allowed} (or blocks.L.KIND, TransformerLens names "
                               f"accepted), or {LOGITS} (the model's output).")
        if layer is None:
            raise FeatoptError(f"site {site!r} needs a layer: write blocks.L.{kind} or give --layer L.")
        parsed = Site(int(layer), kind)
    if parsed.layer < 0 or (n_layers is not None and parsed.layer >= n_layers):
        limit = f"0-{n_layers - 1}" if n_layers else "0 or more"
        raise FeatoptError(f"layer {parsed.layer} is out of range: this model has {n_layers} layers ({limit}).")
    return parsed
