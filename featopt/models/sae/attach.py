"""SAE latents as features for every method: an adapter seen through an SAE at its own site."""

from __future__ import annotations

from pathlib import Path

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site


def site_of(sae) -> str:
    """featopt's site name for an SAE's hook name (SAELens/TransformerLens, sparsify or featopt's)."""
    from featopt.models.sae.formats import site_of as _site_of

    if not sae.cfg.hook_name:
        raise FeatoptError("this SAE names no hook (site): its cfg.json needs a hook_name such as blocks.6.hook_resid_post.")
    return _site_of(sae.cfg.hook_name)


def target_site_of(sae) -> str:
    """featopt's site name of what an SAE reconstructs: a transcoder's `cfg.target_hook_name`
    (e.g. `blocks.6.mlp_out` for one reading `blocks.6.mlp_in`), else its own site (:func:`site_of`)."""
    from featopt.models.sae.formats import site_of as _site_of

    target = getattr(sae.cfg, "target_hook_name", "")
    return _site_of(target) if target else site_of(sae)


def attach(adapter: ModelAdapter, sae, path: str | Path | None = None) -> tuple[ModelAdapter, Site]:
    """`adapter` seen through `sae` at the SAE's own site: `(view, site)`; the view's `run` gives
    the SAE's latents there (see `ModelAdapter.with_features`)."""
    if path is not None:
        sae.source = str(path)
    site = adapter.site(site_of(sae))
    if sae.d_in != adapter.width(site):
        raise FeatoptError(f"the SAE reads {sae.d_in}-wide activations but {site} of model {adapter.name!r} is "
                           f"{adapter.width(site)} wide: use an SAE trained for this model and site.")
    if getattr(sae, "is_transcoder", False):
        target = adapter.site(target_site_of(sae))
        if sae.d_out != adapter.width(target):
            raise FeatoptError(f"the transcoder writes {sae.d_out}-wide activations but its target {target} of model "
                               f"{adapter.name!r} is {adapter.width(target)} wide: use one trained for this model and site.")
    return adapter.with_features(site, sae), site


def attach_path(adapter: ModelAdapter, path: str) -> tuple[ModelAdapter, Site]:
    """Load the SAE at `path` and :func:`attach` it."""
    from featopt.models.sae.formats import load_sae

    return attach(adapter, load_sae(path), path)
