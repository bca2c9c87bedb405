"""`KVPrefix`: prefixes run once with caching, continued by many candidates without re-running them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor
from transformers import Cache

from featopt.models.sites import Site


@dataclass
class KVPrefix:
    """Prefixes run once with caching, to be continued by many candidates without re-running them.

    `ids [G, L]` are the prefixes, `acts` their activations `{site: [G, L, width]}` and `cache`
    their keys/values (blocks up to the deepest site only: the forward stopped there).
    """

    ids: Tensor
    acts: dict[Site, Tensor]
    cache: Cache

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def broadcast(self, index: Tensor) -> Cache:
        """A fresh cache whose row b holds prefix `index[b]` (`index: [B]` in `[0, G)`).

        The stored cache is never modified (a forward appends to the copy it is given), so one
        prefix forward serves every candidate batch. One prefix is expanded, not copied.
        """
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", False) or layer.get_seq_length() == 0:
                continue
            if layer.keys.shape[0] == 1:
                layer.keys = layer.keys.expand(len(index), *layer.keys.shape[1:])
                layer.values = layer.values.expand(len(index), *layer.values.shape[1:])
            else:
                layer.batch_select_indices(index.to(layer.keys.device))
        return cache
