"""`ModelAdapter`: the only code that knows a model's internals.

It wraps an unmodified Hugging Face causal LM and offers what the methods need: the embedding
matrix, a forward from `inputs_embeds` that stops at a site (later blocks never run), a block run
in isolation, the final norm and LM head, and read/write hooks that are always removed.
Activations are exactly what `transformers` computes, because its own modules do the work.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from featopt.errors import FeatoptError
from featopt.models.families import Family, find_family, get_module
from featopt.models.feature_maps import FeatureMap
from featopt.models.hooks import StopForward, WriteFn, installed, isolated_block
from featopt.models.parts import mlp_weight, probe
from featopt.models.placement import execution_device, is_dispatched, onloaded, settle, weight_of
from featopt.models.prefix import KVPrefix
from featopt.models.sites import LOGITS, Site, parse_site
from featopt.models.text import InputText

class ModelAdapter(InputText):
    """A frozen HF causal LM seen through stable site names.

    Args:
        model: a `PreTrainedModel` with an LM head (GPT-2, GPT-Neo, GPT-NeoX, Llama-like, ...).
        tokenizer: its tokenizer (optional for pure-tensor use).
        name: how results name the model.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str | None = None, info=None, bos: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info
        self._embedding_cache: tuple[tuple, Tensor] | None = None
        self.name = name or getattr(model.config, "name_or_path", None) or model.config.model_type
        self.base: nn.Module = model.base_model
        self.family: Family = find_family(model.config.model_type, self.base)
        blocks = get_module(self.base, self.family.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise FeatoptError(f"model type {model.config.model_type!r}: {self.family.blocks} is not a list of blocks.")
        self.blocks: nn.ModuleList = blocks
        self.final_norm: nn.Module = get_module(self.base, self.family.final_norm)
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.dispatched = is_dispatched(model)  # accelerate hooks place its modules (--device_map)
        self._feature_maps: dict[Site, FeatureMap] = {}
        self._block_tuple_len, self._widths = probe(self)
        self.bos = bos  # set after the probe: validated here, so a missing BOS fails at load time

    def __getstate__(self) -> dict:
        # Spawned workers rebuild the (vocab x d_model) scaled rows themselves: don't pickle them.
        return {**self.__dict__, "_embedding_cache": None}

    # ----------------------------------------------------------------- shapes and parts
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def embedding_weight(self) -> Tensor:
        """The raw weight of the input embedding module `[vocab, d_model]` (what a tied LM head
        shares). Not the model's input rows when the module scales them: use :attr:`embedding`.
        Loaded on the embedding's device when accelerate offloaded it (`--device_map`)."""
        weight = self.model.get_input_embeddings().weight
        return weight_of(self.model.get_input_embeddings()) if weight.is_meta else weight

    @property
    def embedding(self) -> Tensor:
        """The effective input embedding `[vocab, d_model]`, in the model's dtype: row i is exactly
        what the model's embedding module gives for token i, so `inputs_embeds=embedding[ids]`
        is the same forward as `input_ids=ids`. Every continuous input (priors, initial texts,
        penalties, decoders, GCG's one-hot gradient) is built from this matrix.

        Gemma's `ScaledWordEmbedding` multiplies the weight by sqrt(d_model) inside the module,
        which `inputs_embeds` skips; a plain `nn.Embedding` is its weight (no copy). Scaled rows
        are computed once and kept until the weight changes (dtype, device, in-place edits).
        """
        module = self.model.get_input_embeddings()
        weight = module.weight
        plain = type(module).forward is nn.Embedding.forward
        if plain and not weight.is_meta:
            return weight.detach()
        # Offloaded weights are meta tensors made anew (and without a version counter in inference mode).
        key = ("offloaded", weight.dtype) if weight.is_meta else (weight.data_ptr(), weight.dtype, weight.device,
                                                                   weight._version)
        if self._embedding_cache is None or self._embedding_cache[0] != key:  # offloaded rows: loaded once, kept
            with torch.no_grad():
                rows = weight_of(module) if plain else module(torch.arange(weight.shape[0], device=self.device))
            self._embedding_cache = (key, rows.detach())
        return self._embedding_cache[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's (execution) device. Every :meth:`run` result is
        here too, whichever device its layer ran on."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def is_causal(self) -> bool:
        return not getattr(self.model.config, "is_encoder_decoder", False)

    def to(self, *args, **kwargs) -> "ModelAdapter":
        """Move (or cast) the model and its feature maps. A model placed by `--device_map` stays
        where accelerate put it (inputs follow it); casting it is refused."""
        if self.dispatched:
            dtype = next((a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)), None)
            if dtype is not None and dtype != self.dtype:
                raise FeatoptError(f"model {self.name!r} was placed by --device_map, so it cannot be cast to {dtype}: "
                                   f"load it with the --dtype wanted.")
            return self
        self.model.to(*args, **kwargs)
        for feature_map in self._feature_maps.values():
            if isinstance(feature_map, nn.Module):
                feature_map.to(*args, **kwargs)
        return self

    # ----------------------------------------------------------------- feature maps (the SAE seam)
    def with_features(self, site: str | Site, feature_map: FeatureMap) -> "ModelAdapter":
        """A view of this adapter (same model) whose `site` yields `feature_map`'s features.

        This is the one seam through which every method targets SAE latents: :meth:`run` (and
        so every forward of the searches, ascent and inversion) returns `feature_map.features`
        of the site's activation, and :meth:`width` its width. Write hooks (:meth:`hooks`)
        still see and edit the raw activation. The original adapter is unchanged.
        """
        site = self.site(site)
        if feature_map.d_in != self._widths[site.kind]:
            raise FeatoptError(f"the feature map reads {feature_map.d_in}-wide activations but {site} of model "
                               f"{self.name!r} is {self._widths[site.kind]} wide: use one made for this site.")
        view = copy.copy(self)
        view._feature_maps = {**self._feature_maps, site: feature_map}
        if isinstance(feature_map, nn.Module):
            feature_map.to(self.device).requires_grad_(False)
        return view

    def with_bos(self, bos: bool) -> "ModelAdapter":
        """This adapter, or a view of it (same model, same feature maps) whose `bos` is `bos`: a
        command's `--bos` applied to an adapter a caller passed in, which is left as it was."""
        if self.bos == bool(bos):
            return self
        view = copy.copy(self)
        view.bos = bool(bos)
        return view

    @property
    def feature_sites(self) -> tuple[Site, ...]:
        """The sites that carry a feature map."""
        return tuple(self._feature_maps)

    def feature_map(self, site: str | Site) -> FeatureMap | None:
        """The feature map at `site`, or None where the site yields raw activations."""
        return self._feature_maps.get(self.site(site))

    def describe_features(self, site: str | Site) -> dict | None:
        """What the features of `site` are, for results (None: the raw activation)."""
        feature_map = self.feature_map(site)
        return None if feature_map is None else feature_map.describe()

    def site(self, site: str | Site | None = None, layer: int | None = None) -> Site:
        """Parse and validate a site for this model (`"blocks.3.mlp_out"`, or a kind and a layer)."""
        return parse_site(site, layer, n_layers=self.n_layers)

    def width(self, site: str | Site) -> int:
        """Number of features at a site (d_model, the MLP width for `mlp_hidden`, or the
        latents of a feature map attached there)."""
        site = self.site(site)
        if site in self._feature_maps:
            return self._feature_maps[site].width
        if site.kind == LOGITS:
            return self.lm_head.weight.shape[0]
        return self._widths[site.kind]

    def embed(self, input_ids: Tensor) -> Tensor:
        """`input_ids: [batch, tokens]` -> `[batch, tokens, d_model]` (the model's own lookup)."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def unembed(self, resid: Tensor) -> Tensor:
        """Residual stream `[..., d_model]` -> logits `[..., vocab]` through final norm and LM head."""
        logits = self.lm_head(self.final_norm(resid))
        # Gemma 2 squashes logits with cap * tanh(logits / cap) in its CausalLM forward, after the head.
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    # ----------------------------------------------------------------- MLP neuron weights (read-only)
    def mlp_up_weight(self, layer: int) -> Tensor:
        """Input weights of the MLP neurons of block `layer`, `[neurons, d_model]`: row n is what
        neuron n reads from the (normed) residual stream (the up-projection; GPT-2's `c_fc`)."""
        with onloaded(self.blocks[layer]):  # offloaded (--device_map): the block's weights loaded for the copy
            return mlp_weight(self, layer, self.family.mlp_up, "up-projection", self._widths["mlp_hidden"])

    def mlp_gate_weight(self, layer: int) -> Tensor:
        """The gate-projection rows `[neurons, d_model]` of a gated MLP (Llama's `gate_proj`)."""
        if self.family.mlp_gate is None:
            raise FeatoptError(f"model {self.name!r} has no gated MLP, so there is no gate weight: use the up-projection.")
        with onloaded(self.blocks[layer]):
            return mlp_weight(self, layer, self.family.mlp_gate, "gate-projection", self._widths["mlp_hidden"])

    # ----------------------------------------------------------------- hooks
    def hooks(self, read: Iterable[Site | str] = (), write: Mapping[Site | str, WriteFn] | None = None, *,
              stop_after_read: bool = False):
        """Install read and write hooks for the duration of a `with` block; always removed.

        Yields a dict that fills with `{site: activation [batch, tokens, width]}` as the model
        runs. Write hooks replace a site's activation (clamping, steering, ablation). With
        `stop_after_read`, the forward is cut short once every read site is captured (use
        :meth:`run` rather than this flag directly).
        """
        return installed(self, [self.site(s) for s in read], {self.site(s): fn for s, fn in (write or {}).items()},
                         stop_after_read=stop_after_read)

    def isolated(self, layer: int):
        """Run block `layer` alone on the given embeddings: blocks before it are skipped (the
        documents' "features of each layer without preceding layers")."""
        return isolated_block(self.blocks, layer, self._block_tuple_len)

    # ----------------------------------------------------------------- forwards
    def run(
        self,
        sites: Iterable[Site | str],
        *,
        inputs_embeds: Tensor | None = None,
        input_ids: Tensor | None = None,
        isolated: bool = False,
        write: Mapping[Site | str, WriteFn] | None = None,
        cache: Cache | None = None,
        bos: bool = False,
    ) -> dict[Site, Tensor]:
        """Run the model until every site in `sites` is read, then stop.

        Args:
            inputs_embeds: `[batch, tokens, d_model]` (gradients flow), or
            input_ids: `[batch, tokens]`.
            isolated: skip the blocks before the shallowest requested site's block.
            bos: run the BOS token first, a fixed token before the given ones whose own
                activations are dropped (the continuous methods' `--bos`).
            cache: continue after the cached tokens (see :meth:`prefix`): positions
                and the attention mask follow them, and the cache is extended in place.
        Returns:
            `{site: [batch, tokens, width]}`, for the new tokens only when continuing a cache;
            a site with a feature map (:meth:`with_features`) gives its features.
        """
        sites = [self.site(s) for s in sites]
        if not sites:
            raise FeatoptError("no site to read: give at least one site.")
        if (inputs_embeds is None) == (input_ids is None):
            raise FeatoptError("give exactly one of inputs_embeds and input_ids.")
        if bos:
            if cache is not None:
                raise FeatoptError("a cached prefix already holds the input's start: put the BOS token in the prefix.")
            first = torch.tensor([self.bos_token_id()], device=self.device)
            if inputs_embeds is not None:  # the model's own row for BOS, so it equals input_ids=[BOS, ...]
                row = self.embedding[first].to(inputs_embeds.dtype).expand(len(inputs_embeds), 1, -1)
                inputs_embeds = torch.cat([row, inputs_embeds.to(self.device)], dim=1)
            else:
                input_ids = torch.cat([first.expand(len(input_ids), 1), input_ids.to(self.device)], dim=1)
        kwargs = {"use_cache": False}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds.to(device=self.device, dtype=self.dtype)
        else:
            kwargs["input_ids"] = input_ids.to(self.device)
            # Explicit, so HF does not warn about padding: inputs are never padded here.
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        if cache is not None:
            if isolated:
                raise FeatoptError("an isolated block cannot continue a cached prefix: drop the prefix or the isolation.")
            batch, new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            past = cache.get_seq_length()
            kwargs.update(
                cache=cache, use_cache=True,
                attention_mask=torch.ones(batch, past + new, dtype=torch.long, device=self.device),
                position_ids=torch.arange(past, past + new, device=self.device).expand(batch, -1),
            )
        # The logits are the last block's output through the final norm and the LM head (`unembed`).
        last = Site(self.n_layers - 1, "resid_post")
        reads = list(dict.fromkeys(last if s.kind == LOGITS else s for s in sites))
        isolation = self.isolated(min(s.layer for s in reads)) if isolated else contextlib.nullcontext()
        with isolation, self.hooks(read=reads, write=write, stop_after_read=True) as captured:
            try:
                self.base(**kwargs)
            except StopForward:
                if self.dispatched:  # a block stopped inside its forward: its offloaded weights go back
                    settle(self.base)
        if any(s.kind == LOGITS for s in sites):
            captured[Site(self.n_layers - 1, LOGITS)] = self.unembed(captured[last])
        # Under --device_map each layer's sites are read where it ran: gathered on the inputs' device.
        return {s: self._features(s, captured[s][:, int(bos):].to(self.device)) for s in sites}

    def _features(self, site: Site, acts: Tensor) -> Tensor:
        feature_map = self._feature_maps.get(site)
        return acts if feature_map is None else feature_map.features(acts)

    def prefix(self, sites: Iterable[Site | str], input_ids: Tensor) -> KVPrefix:
        """Run prefixes `input_ids [G, L]` to the deepest of `sites`, keeping their keys/values;
        continue them with `run(..., cache=prefix.broadcast(index))`."""
        cache = DynamicCache(config=self.model.config)
        acts = self.run(sites, input_ids=input_ids, cache=cache)
        return KVPrefix(input_ids.to(self.device), acts, cache)

    def forward_to_site(self, inputs_embeds: Tensor, site: Site | str, *, isolated: bool = False) -> Tensor:
        """`[batch, tokens, d_model]` -> the activation at `site`, `[batch, tokens, width]`."""
        site = self.site(site)
        return self.run([site], inputs_embeds=inputs_embeds, isolated=isolated)[site]

    def run_block(self, layer: int, inputs_embeds: Tensor) -> Tensor:
        """Block `layer` alone on `inputs_embeds` `[batch, tokens, d_model]` -> its output."""
        return self.forward_to_site(inputs_embeds, Site(layer, "resid_post"), isolated=True)

    def logits(self, input_ids: Tensor) -> Tensor:
        """The plain HF forward: `[batch, tokens]` -> `[batch, tokens, vocab]`."""
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
