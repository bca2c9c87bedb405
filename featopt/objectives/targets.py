"""The built-in objectives over a selection of features: maximize them, or pull them towards a
constant C (the source documents' `||C - O_f(e)||_1`); and the same read through an SAE's
latents, a direction in activation space, or a token's logit or log-probability."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.models.feature_maps import Directions, LogProbs
from featopt.objectives.objective import Context, Objective
from featopt.objectives.selection import Selection

_OVER_WORDS = {"mean": "", "sum": ", sum over positions", "last": ", last position"}


def _selection(selection: Selection | str, site: Site | str | None, over: str, feature_map=None) -> Selection:
    if isinstance(selection, Selection):
        return selection
    if site is None:
        raise FeatoptError(f"the features {selection!r} need a site: give site='blocks.L.KIND'.")
    return Selection(site, selection, feature_map=feature_map, over=over)


class SelectionObjective(Objective):
    """An objective over one :class:`Selection`: its site is what it reads, its problems are the
    objective's problems."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self._refresh()

    def _refresh(self) -> None:
        self.sites = (self.selection.site,) if isinstance(self.selection.site, Site) else ()
        self.n_problems = len(self.selection)
        self.description = self.describe()

    def describe(self) -> str:
        raise NotImplementedError

    def where(self) -> str:
        """The site, how positions combine, and the feature map, for descriptions."""
        fmap = self.selection.feature_map
        through = "" if fmap is None else f" via {fmap.describe().get('kind', 'map')}"
        return f"{self.selection.site}{through}{_OVER_WORDS[self.selection.over]}"

    def bind(self, adapter: ModelAdapter) -> Objective:
        self.selection.bind(adapter)
        self._refresh()
        return self


class Maximize(SelectionObjective):
    """Minus each problem's activation (the mean of its features, combined over positions)."""

    def describe(self) -> str:
        return f"maximize({self.where()})"

    def loss(self, ctx: Context) -> Tensor:
        return -self.selection.activation(ctx.acts[self.selection.site], ctx.rows)

    def loss_all(self, ctx: Context) -> Tensor:
        return -self.selection.activation_all(ctx.acts[self.selection.site])


class L1Target(SelectionObjective):
    """The documents' loss `||C - O_f(e)||_1`: the sum over the problem's cells (its positions
    times its features) of `|C - activation|`, so below C it is an ascent on the features."""

    def __init__(self, selection: Selection, target: float = 100.0):
        self.target = float(target)
        super().__init__(selection)

    def describe(self) -> str:
        return f"l1_target({self.where()}, C={self.target:g})"

    def _cells(self, acts: Tensor, rows: Tensor) -> Tensor:
        sel = self.selection
        if sel.n_tokens == acts.shape[1] and sel.width == acts.shape[-1] and sel.over == "mean":
            return sel.weights(rows, acts)  # the fixed-length masks (gradient methods)
        pos = (sel.position_weights(acts.shape[1], acts.device) > 0).to(acts.dtype)[rows]
        feat = (sel.feature_weights(acts.shape[-1], acts.device) > 0).to(acts.dtype)[rows]
        return pos[:, :, None] * feat[:, None, :]

    def loss(self, ctx: Context) -> Tensor:
        acts = self.selection.read(ctx.acts[self.selection.site])
        return ((self.target - acts).abs() * self._cells(acts, ctx.rows.to(acts.device))).sum(dim=(1, 2))

    def loss_all(self, ctx: Context) -> Tensor:
        index = self.selection.feature_index()
        if index is None:
            return super().loss_all(ctx)
        x = self.selection.read(ctx.acts[self.selection.site])
        x = x.to(torch.promote_types(x.dtype, torch.float32)).index_select(2, index.to(x.device))  # [B, T, P]
        pos = (self.selection.position_weights(x.shape[1], x.device) > 0).to(x.dtype)  # [P, T]
        return ((self.target - x).abs() * pos.T[None]).sum(dim=1)


class TokenTarget(Maximize):
    """A token's logit (or log-probability) at the last position: the model's prediction of it
    next. `token` is an id or a text of exactly one token, resolved when bound."""

    def __init__(self, token: int | str, log_probs: bool = False):
        self.token, self.log_probs = token, log_probs
        spec = f"[:, :, {token}]" if isinstance(token, int) else "[:, :, 0]"
        super().__init__(Selection("logits", spec, over="last"))

    def describe(self) -> str:
        return f"{'logprob' if self.log_probs else 'logit'}({self.token!r})"

    def bind(self, adapter: ModelAdapter) -> Objective:
        token = self.token
        if isinstance(token, str):
            ids = adapter.encode(token, bos=False).tolist()
            if len(ids) != 1:
                raise FeatoptError(f"token {token!r} is {len(ids)} tokens for model {adapter.name!r}: give one token "
                                   "(mind the leading space) or its id.")
            token = ids[0]
        feature_map = LogProbs(adapter.width("logits")) if self.log_probs else None
        self.selection = Selection("logits", f"[:, :, {token}]", feature_map=feature_map, over="last")
        return super().bind(adapter)


# ----------------------------------------------------------------------------- factories
def maximize(selection: Selection | str, site: Site | str | None = None, *, over: str = "mean",
             feature_map=None) -> Maximize:
    """`maximize(sel)`, or `maximize("[:, :, 0-4]", "blocks.3.mlp_out")`: each problem's activation."""
    return Maximize(_selection(selection, site, over, feature_map))


def l1_target(selection: Selection | str, target: float = 100.0, site: Site | str | None = None, *,
              over: str = "mean", feature_map=None) -> L1Target:
    """`||C - O_f(e)||_1` over each problem's cells, C = `target`."""
    return L1Target(_selection(selection, site, over, feature_map), target)


def latent(sae, features: str = "[:, :, 0]", *, over: str = "mean") -> Maximize:
    """An SAE's (or transcoder's) latents as features: maximize them, read at the SAE's own site."""
    from featopt.models.sae.attach import site_of

    return Maximize(Selection(site_of(sae), features, feature_map=sae, over=over))


def direction(vector: Tensor | str | Path, site: Site | str, positions: str = ":", *, over: str = "mean") -> Maximize:
    """The projection of the site's activation on `vector` (`[d]`, or a `.pt`/`.safetensors`/`.npy`
    file holding it), at `positions`: maximize it."""
    name = "direction"
    if isinstance(vector, (str, Path)):
        name, vector = Path(vector).name, load_vector(vector)
    return Maximize(Selection(site, f"[:, {positions}, 0]", feature_map=Directions(vector, name), over=over))


def logit(token: int | str) -> TokenTarget:
    """The logit of `token` at the last position (the model's output; runs the whole model)."""
    return TokenTarget(token)


def logprob(token: int | str) -> TokenTarget:
    """The log-probability of `token` as the next token after the input."""
    return TokenTarget(token, log_probs=True)


def load_vector(path: str | Path) -> Tensor:
    """A direction from a file: `.pt` (a tensor), `.safetensors` (its one tensor) or `.npy`."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise FeatoptError(f"{path} holds {len(tensors)} tensors: a direction file holds exactly one.")
            return next(iter(tensors.values()))
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise FeatoptError(f"cannot read a direction from {str(path)!r} ({type(error).__name__}): give a .pt, "
                           ".safetensors or .npy file holding one [d_model] vector.") from None
