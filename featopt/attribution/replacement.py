"""The local replacement model of one prompt (Circuit Tracing, "Building a local replacement model").

On a prompt, the model is run once as it is (:meth:`ReplacementModel.capture`), which fixes:

- each attention layer's pattern `[heads, T, T]` (read from the unmodified module in eager mode);
- each RMSNorm's scale `1 / sqrt(mean(x^2) + eps)` per position (`[T, 1]`);
- each MLP's input and output; its transcoder's activations `a_l = encode(mlp_in_l)` `[T, d_sae]`
  and its error `e_l = mlp_out_l - (decode(a_l) + skip(mlp_in_l))` `[T, d_model]`.

:meth:`ReplacementModel.linear` then runs the unmodified Hugging Face modules again, batched, with
write hooks that make the network linear in its *sources*: the token embeddings, every feature
activation and every error, which are leaves of the autograd graph. A norm multiplies by its frozen
scale; an attention layer applies its frozen pattern to its values (`o_proj(pattern @ v_proj(x))`);
an MLP is replaced by `decode(a_l) + skip(mlp_in_l) + e_l` with `a_l` and `e_l` the leaves, so no
gradient crosses an MLP or a feature's own nonlinearity. At the captured values this forward gives
the model's own logits (:meth:`ReplacementModel.check`); its gradients are the direct effects that
`adjacency.py` reads.

The freezing of attention and norms is the model layer's (`featopt/models/linearize.py`); the
MLPs are replaced through the adapter's `mlp_in` read and `mlp_out` write hooks. Llama-like models
only (llama, mistral, qwen2, qwen3): other families end in one sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, parse_site
from featopt.models.linearize import Frozen, capture_frozen, check_linearizable, frozen
from featopt.models.sae import SparseAutoencoder
from featopt.models.sites import Site


@dataclass
class Prompt:
    """What the prompt's own forward fixes (tensors of one prompt, float32)."""

    input_ids: Tensor  # [T]
    embeds: Tensor  # [T, d_model]
    frozen: Frozen  # attention patterns and norm scales, and the model's own logits [T, vocab]
    mlp_in: list[Tensor]  # per layer, [T, d_model]
    acts: list[Tensor]  # per layer, [T, d_sae]: the transcoder's activations
    errors: list[Tensor]  # per layer, [T, d_model]

    @property
    def logits(self) -> Tensor:
        return self.frozen.logits


@dataclass
class LinearPass:
    """One batched forward of the linearised model: its sources (leaves unless given) and what the
    attribution reads from it, all `[B, T, ...]`."""

    embeds: Tensor  # [B, T, d_model]
    acts: list[Tensor]  # per layer, [B, T, d_sae]
    errors: list[Tensor]  # per layer, [B, T, d_model]
    mlp_in: list[Tensor]  # per layer, [B, T, d_model]: linear in the sources
    final: Tensor  # [B, T, d_model]: the final norm's output (the LM head reads it)
    logits: Tensor  # [B, T, vocab]


class ReplacementModel:
    """A model with one transcoder per layer, each reading `blocks.L.mlp_in` and writing `blocks.L.mlp_out`.

    Args:
        adapter: the model (float32 weights are used as they are).
        transcoders: one per layer, in any order; checked to cover every layer once, at the
            model's width.
        skip_first: leading positions whose features and errors are no nodes (circuit-tracer
            leaves out position 0, an attention sink far outside what transcoders are trained on:
            `sae train --skip_first 1`). There the features are set to 0, the error holds the whole
            MLP output (so the forward is unchanged), and `attribution` gives the errors no edges:
            those MLP outputs are constants of the graph, like biases.
    """

    def __init__(self, adapter: ModelAdapter, transcoders: Sequence[SparseAutoencoder], skip_first: int = 0):
        check_linearizable(adapter)
        if skip_first < 0:
            raise FeatoptError(f"--skip_first must be at least 0, got {skip_first}.")
        self.skip_first = skip_first
        self.adapter = adapter
        self.transcoders = self._by_layer(adapter, transcoders)
        self.mlp_in = [Site(layer, "mlp_in") for layer in range(adapter.n_layers)]
        self.mlp_out = [Site(layer, "mlp_out") for layer in range(adapter.n_layers)]

    @staticmethod
    def _by_layer(adapter: ModelAdapter, transcoders: Sequence[SparseAutoencoder]) -> list[SparseAutoencoder]:
        by_layer: dict[int, SparseAutoencoder] = {}
        for tc in transcoders:
            site = parse_site(tc.cfg.hook_name, n_layers=adapter.n_layers)
            target = parse_site(tc.cfg.target_hook_name, n_layers=adapter.n_layers) if tc.is_transcoder else None
            if site.kind != "mlp_in" or target is None or target.kind != "mlp_out" or target.layer != site.layer:
                raise FeatoptError(f"an attribution graph needs transcoders from blocks.L.mlp_in to blocks.L.mlp_out; "
                                   f"got one reading {site.name} and writing {target.name if target else 'its own input'}.")
            if tc.d_in != adapter.d_model or tc.d_out != adapter.d_model:
                raise FeatoptError(f"the transcoder of layer {site.layer} is {tc.d_in} -> {tc.d_out} wide; "
                                   f"{adapter.name} has width {adapter.d_model}: transcoders for another model?")
            if site.layer in by_layer:
                raise FeatoptError(f"two transcoders for layer {site.layer}: give one per layer.")
            by_layer[site.layer] = tc
        missing = [layer for layer in range(adapter.n_layers) if layer not in by_layer]
        if missing:
            raise FeatoptError(f"an attribution graph needs a transcoder for every layer 0-{adapter.n_layers - 1} of "
                               f"{adapter.name}; missing layer{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(str, missing))}.")
        return [by_layer[layer] for layer in range(adapter.n_layers)]

    # ----------------------------------------------------------------- the prompt's own forward
    @torch.no_grad()
    def capture(self, input_ids: Tensor) -> Prompt:
        """Run the model on `input_ids [T]` as it is and record what the replacement freezes."""
        state, acts_read = capture_frozen(self.adapter, input_ids, read=self.mlp_in + self.mlp_out)
        mlp_in = [acts_read[site] for site in self.mlp_in]
        acts, errors = [], []
        for tc, x, site in zip(self.transcoders, mlp_in, self.mlp_out):
            a = tc.encode(x)
            a[:self.skip_first] = 0
            acts.append(a)
            errors.append(acts_read[site] - (tc.decode(a) + tc.skip_out(x)))
        ids = input_ids.to(self.adapter.device).reshape(-1)
        embeds = self.adapter.embed(ids[None])[0].float()
        return Prompt(ids, embeds, state, mlp_in, acts, errors)

    # ----------------------------------------------------------------- the linear forward
    def linear(self, prompt: Prompt, batch: int, sources: dict | None = None) -> LinearPass:
        """The linearised forward of `batch` copies of the prompt. Its sources are new leaves that
        require grad, set to the captured values, unless `sources` gives them (`embeds [B, T, d]`,
        `acts` and `errors`: lists per layer)."""
        adapter = self.adapter
        sources = sources or {}
        leaf = lambda t: t.expand(batch, *t.shape).clone().requires_grad_(True)  # noqa: E731
        embeds = sources.get("embeds", leaf(prompt.embeds))
        acts = sources.get("acts", [leaf(a) for a in prompt.acts])
        errors = sources.get("errors", [leaf(e) for e in prompt.errors])
        final: list[Tensor] = []

        def replace(layer: int):
            def write(act: Tensor, site: Site) -> Tensor:  # the MLP's output: transcoder, skip and error
                tc, x = self.transcoders[layer], captured[self.mlp_in[layer]]
                return tc.decode(acts[layer]) + tc.skip_out(x) + errors[layer]
            return write

        write = {site: replace(layer) for layer, site in enumerate(self.mlp_out)}
        with frozen(adapter, prompt.frozen, on_final_norm=final.append), \
                adapter.hooks(read=self.mlp_in, write=write) as captured:
            logits = adapter.model(inputs_embeds=embeds.to(adapter.dtype)).logits.float()
        return LinearPass(embeds, acts, errors, [captured[site] for site in self.mlp_in], final[-1], logits)

    def check(self, prompt: Prompt, rtol: float = 1e-4) -> float:
        """The largest difference between the replacement's logits (errors included) and the
        model's own on the prompt, relative to the logits' scale; one sentence if above `rtol`."""
        with torch.no_grad():
            logits = self.linear(prompt, 1).logits[0]
        gap = float((logits - prompt.logits).abs().max() / prompt.logits.abs().max().clamp_min(1e-12))
        if not gap <= rtol:
            raise FeatoptError(f"the replacement model does not reproduce the model's logits on this prompt "
                               f"(relative difference {gap:.2e} > {rtol:g}): an unsupported layer in the model?")
        return gap

