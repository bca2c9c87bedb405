"""`ModelHandle`: the frozen model a LightningModule runs, held outside its module tree.

Multi-process runs pickle the LightningModule into every worker. The language model must not
travel that way (hundreds of MB, and transformers' modules may carry unpicklable hooks): a handle
pickles a *recipe* instead, and the worker rebuilds the model on first use. The recipe is the
command's loader (load the model by name, as the parent did) when there is one, else the model's
config and weights (a model built in code); either way the feature maps of the view (SAEs attached
with `with_features`) and its `--bos` come along, so the worker sees the same view as the parent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from featopt.models import ModelAdapter


def adapter_from_parts(config, weights: dict, tokenizer, name: str) -> ModelAdapter:
    """Rebuild a model in a worker from its HF config and state dict (a model built in code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights)
    dtype = next(iter(weights.values())).dtype
    return ModelAdapter(model.to(dtype).eval().requires_grad_(False), tokenizer, name=name)


def _rebuild(base: Callable[[], ModelAdapter], feature_maps: dict, bos: bool) -> ModelAdapter:
    adapter = base()
    for site, feature_map in feature_maps.items():
        adapter = adapter.with_features(site, feature_map)
    return adapter.with_bos(bos)


class ModelHandle:
    """A model that is loaded here, or rebuilt on first use in a worker.

    Args:
        adapter: the loaded model (a view with feature maps and `--bos` is fine), or None.
        loader: a zero-argument callable that loads the same base model by name (picklable:
            `functools.partial(load_model, name, ...)`); None ships the weights instead.
    """

    def __init__(self, adapter: ModelAdapter | None = None, loader: Callable[[], ModelAdapter] | None = None):
        if adapter is None and loader is None:
            raise ValueError("a ModelHandle needs an adapter or a loader")
        self._adapter, self._loader, self._recipe = adapter, loader, None

    @classmethod
    def of(cls, model: "ModelAdapter | Callable[[], ModelAdapter] | ModelHandle | None") -> "ModelHandle | None":
        """A handle for what a LightningModule was given: an adapter, a loader, a handle or None."""
        if model is None or isinstance(model, ModelHandle):
            return model
        if isinstance(model, ModelAdapter):
            return cls(model)
        return cls(loader=model)

    @property
    def adapter(self) -> ModelAdapter:
        """The model, built now if this is a worker's first use."""
        if self._adapter is None:
            self._adapter = self._recipe() if self._recipe is not None else self._loader()
        return self._adapter

    @property
    def loaded(self) -> bool:
        return self._adapter is not None

    def __getstate__(self) -> dict:
        adapter, recipe = self._adapter, self._recipe
        if adapter is not None:
            maps = {site: adapter.feature_map(site) for site in adapter.feature_sites}
            base = self._loader or functools.partial(adapter_from_parts, adapter.model.config, adapter.model.state_dict(),
                                                     adapter.tokenizer, adapter.name)
            recipe = functools.partial(_rebuild, base, maps, adapter.bos)
        return {"_adapter": None, "_loader": self._loader, "_recipe": recipe}
