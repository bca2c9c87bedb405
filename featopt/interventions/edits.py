"""Edits of a site's activation, installed by :func:`edited` through the adapter's write hooks.

An edit is a function `(act [batch, tokens, width], site) -> act` (the adapter's `WriteFn`), plus
the site it belongs to. The constructors here cover SAE latents and directions (documents 002
and 003); a neuron clamp (:func:`featopt.interventions.clamp.clamp`) is the same kind of thing.

- :func:`scale_latents`: `x + (r - 1) * sum_i z_i(x) W_dec[i]`, each latent's share of the SAE
  reconstruction rescaled by `r` (document 003's rescaling coefficient): `r = 0` removes the
  latents' contributions (deactivation), `r = 1` changes nothing, bit for bit, `r > 1` amplifies.
  The SAE's error term is untouched, so only the chosen latents move.
- :func:`latent_edits`: the same as a list of edits placed for any SAE: at its own site, or for a
  transcoder at its target site (what its decoder writes, the MLP's output) with the latents
  encoded from its input site in the same forward.
- :func:`add_direction`: `x + coef * v` at every position (steering a latent that is not active).
- :func:`project_out`: `x - (x . d) d` for unit `d`: no component along the direction at all.

Per-row edits: `latents` and `r` may be given per batch row (`[B, n]` and `[B]` or `[B, n]`), so
one batched forward runs many different interventions (one per row).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site

WriteFn = Callable[[Tensor, Site], Tensor]


@dataclass
class Edit:
    """One write function at one site. Several edits at the same site apply in the order given."""

    site: Site | str
    fn: WriteFn
    label: str = ""


@contextlib.contextmanager
def edited(adapter: ModelAdapter, edits: Iterable[Edit]) -> Iterator[None]:
    """Install `edits` for every forward inside the `with` block; always removed.

    Edits at one site compose in order (each sees the previous one's output). Edits at sites of
    different layers all apply in the same forward, which is what multi-layer steering needs.
    """
    by_site: dict[Site, list[WriteFn]] = {}
    for edit in edits:
        by_site.setdefault(adapter.site(edit.site), []).append(edit.fn)

    def chain(fns: Sequence[WriteFn]) -> WriteFn:
        def write(act: Tensor, site: Site) -> Tensor:
            for fn in fns:
                act = fn(act, site)
            return act
        return write

    with adapter.hooks(write={site: chain(fns) for site, fns in by_site.items()}):
        yield


def _check_r(r) -> None:
    values = r.flatten().tolist() if isinstance(r, Tensor) else [r]
    for value in values:
        if not math.isfinite(float(value)):
            raise FeatoptError(f"the rescaling coefficient r must be a finite number, got {value}.")


def _per_row(value, batch: int, n: int, dtype, device, what: str) -> Tensor:
    """`value` (number, `[n]`, `[B]` or `[B, n]`) as `[B, n]`."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(batch, n)
    if t.ndim == 1 and len(t) == n and (batch == 1 or len(t) != batch):
        return t.expand(batch, n)
    if t.ndim == 1 and len(t) == batch:
        return t[:, None].expand(batch, n)
    if t.ndim == 2 and t.shape == (batch, n):
        return t
    raise FeatoptError(f"{what} of shape {list(t.shape)} does not fit {batch} rows of {n} latents: "
                       f"give a number, [{n}], [{batch}] or [{batch}, {n}].")


def scale_latents(sae, latents, r=0.0, *, positions: Tensor | None = None,
                  source: Callable[[], Tensor] | None = None) -> WriteFn:
    """A write function rescaling SAE latents' contributions: `x + (r - 1) * sum_i z_i(x) W_dec[i]`.

    `sae` reads the site the edit is installed at. `latents`: an int, a list, `[n]` (the same for
    every row) or `[B, n]` (per batch row; repeat an index or use r = 1 to pad). `r`: a number,
    `[n]`, `[B]` or `[B, n]`. `positions`: optional bool mask `[B, T]` (or `[T]`) of the positions
    edited; all positions by default. `z(x)` is the SAE's encoding of the activation as it arrives
    (after earlier edits at the same site), or of `source()` when given (a transcoder's input,
    read earlier in the same forward: see :func:`latent_edits`). Arithmetic runs in the SAE's
    dtype and is rounded once to the model's; with r = 1 the output equals the input exactly.
    """
    _check_r(r)
    idx = torch.as_tensor(latents, dtype=torch.long)
    if idx.ndim == 0:
        idx = idx[None]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae):
        raise FeatoptError(f"latent {int(idx.max()) if int(idx.max()) >= sae.d_sae else int(idx.min())} is out of range: "
                           f"the SAE has {sae.d_sae} latents (0-{sae.d_sae - 1}).")

    def write(act: Tensor, _site: Site) -> Tensor:
        W = sae.W_dec.detach()
        x = act.to(device=W.device, dtype=W.dtype)
        batch, n = x.shape[0], idx.shape[-1]
        rows = idx.to(W.device).expand(batch, n) if idx.ndim == 1 else idx.to(W.device)
        if rows.shape[0] != batch:
            raise FeatoptError(f"per-row latents for {rows.shape[0]} rows but the forward has {batch}.")
        factor = _per_row(r, batch, n, W.dtype, W.device, "r") - 1  # [B, n]
        z = sae.encode(x if source is None else source().to(device=W.device, dtype=W.dtype))  # [B, T, d_sae]
        picked = z.gather(-1, rows[:, None, :].expand(-1, x.shape[1], -1))  # [B, T, n]
        coef = picked * factor[:, None, :]
        if positions is not None:
            mask = positions.to(W.device)
            coef = coef * (mask if mask.ndim == 2 else mask[None]).to(W.dtype)[..., None]
        delta = torch.einsum("btn,bnd->btd", coef, W[rows])  # sum over the latents of each row
        return (x + delta).to(device=act.device, dtype=act.dtype)

    return write


def latent_edits(sae, latents, r=0.0, *, positions: Tensor | None = None, label: str = "") -> list[Edit]:
    """:func:`scale_latents` of `sae` as edits for :func:`edited`, wherever `sae` sits.

    An SAE: one edit at its site. A transcoder (reads `cfg.hook_name`, writes `cfg.target_hook_name`):
    an edit at its input site that only records the activation (unchanged), and the rescaling at
    its target site, `y + (r - 1) * sum_i z_i(x) W_dec[i]` with `x` that recorded input; the model
    computes the input first (the MLP's input before its output), so both are of one forward.
    """
    from featopt.models.sae.attach import site_of, target_site_of

    site, target = site_of(sae), target_site_of(sae)
    if target == site:
        return [Edit(site, scale_latents(sae, latents, r, positions=positions), label)]
    seen: dict[str, Tensor] = {}

    def record(act: Tensor, _site: Site) -> Tensor:
        seen["x"] = act
        return act

    def source() -> Tensor:
        if "x" not in seen:
            raise FeatoptError(f"the transcoder's input {site} was not computed before its target {target}: "
                               "it must read a site its target depends on.")
        return seen["x"]

    return [Edit(site, record, label), Edit(target, scale_latents(sae, latents, r, positions=positions, source=source), label)]


def add_direction(direction: Tensor, coef) -> WriteFn:
    """A write function adding `coef * direction [width]` at every position (`coef`: a number or
    `[B]` per row)."""
    _check_r(coef)
    direction = direction.detach()

    def write(act: Tensor, _site: Site) -> Tensor:
        d = direction.to(device=act.device, dtype=torch.float32)
        c = torch.as_tensor(coef, dtype=torch.float32, device=act.device)
        c = c.reshape(-1, 1, 1) if c.ndim == 1 else c
        return (act.float() + c * d).to(act.dtype)

    return write


def project_out(direction: Tensor) -> WriteFn:
    """A write function removing the component along `direction [width]`: `x - (x . d) d`, `d` unit."""
    d = direction.detach()
    norm = float(d.norm())
    if norm == 0 or not math.isfinite(norm):
        raise FeatoptError("the direction to project out is zero or not finite: give a non-zero direction.")
    d = d / norm

    def write(act: Tensor, _site: Site) -> Tensor:
        u = d.to(device=act.device, dtype=torch.float32 if d.dtype != torch.float64 else d.dtype)
        x = act.to(u.dtype)
        return (x - (x @ u)[..., None] * u).to(act.dtype)

    return write
