"""Read and write hooks on the unmodified Hugging Face modules, always removed, and blocks run in
isolation. `ModelAdapter.hooks` / `.isolated` / `.run` are the front door; this is the machinery."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from featopt.models.families import get_module
from featopt.models.sites import LOGITS, SITE_KINDS, Site

#: A write hook gets the site's activation `[batch, tokens, width]` and returns the new one.
WriteFn = Callable[[Tensor, Site], Tensor]

KIND_ORDER = {kind: i for i, kind in enumerate((*SITE_KINDS, LOGITS))}


class StopForward(Exception):
    """Raised by a hook once every requested site is read, so later blocks never run."""


class Passthrough(nn.Module):
    """Stands in for a skipped block when a block runs in isolation: returns its input unchanged,
    in the same output shape (tensor or tuple) the real block returns."""

    def __init__(self, tuple_len: int | None):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if self.tuple_len is None:
            return hidden_states
        return (hidden_states,) + (None,) * (self.tuple_len - 1)


def first(output):
    """A module's main output: the tensor, or the first item of the tuple blocks return."""
    return output[0] if isinstance(output, (tuple, list)) else output


def hook_point(adapter, site: Site) -> tuple[nn.Module, bool]:
    """The HF module for a site and whether the activation is its input (True) or output."""
    block = adapter.blocks[site.layer]
    family = adapter.family
    path = {
        "resid_pre": None, "resid_post": None, "attn_out": family.attn_out or family.attn,
        "mlp_in": family.mlp, "mlp_out": family.mlp_out or family.mlp, "mlp_hidden": family.mlp_down,
    }[site.kind]
    module = block if path is None else get_module(block, path)
    return module, site.kind in ("resid_pre", "mlp_in", "mlp_hidden")


@contextlib.contextmanager
def installed(adapter, read: Sequence[Site], write: Mapping[Site, WriteFn], *,
              stop_after_read: bool = False) -> Iterator[dict[Site, Tensor]]:
    """Hooks that capture `read` and replace `write` sites' activations (see `ModelAdapter.hooks`);
    with `stop_after_read` the forward raises :class:`StopForward` once every read site is in."""
    captured: dict[Site, Tensor] = {}
    handles = []
    # Under --device_map a layer may run on another device than the inputs: a write hook sees the
    # activation on the inputs' device (where its own tensors are), and its result goes back.
    home = adapter.device if getattr(adapter, "dispatched", False) else None

    def make_hook(site: Site, is_input: bool):
        fn, wanted = write.get(site), site in read

        def finish(act: Tensor) -> Tensor:
            if fn is not None:
                act = fn(act, site) if home is None else fn(act.to(home), site).to(act.device)
            if wanted:
                captured[site] = act
                if stop_after_read and len(captured) == len(read):
                    raise StopForward
            return act

        if is_input:
            def pre_hook(module, args, kwargs):
                if args:
                    act = finish(args[0])
                    return (act, *args[1:]), kwargs
                act = finish(kwargs["hidden_states"])
                return args, {**kwargs, "hidden_states": act}
            return pre_hook

        def post_hook(module, args, kwargs, output):
            act = finish(first(output))
            if fn is None:
                return None
            return (act, *output[1:]) if isinstance(output, tuple) else act
        return post_hook

    try:
        for site in sorted(set(read) | set(write), key=lambda s: (s.layer, KIND_ORDER[s.kind])):
            module, is_input = hook_point(adapter, site)
            hook = make_hook(site, is_input)
            if is_input:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def isolated_block(blocks: nn.ModuleList, layer: int, tuple_len: int | None) -> Iterator[None]:
    """Blocks before `layer` swapped for pass-throughs for the duration of the `with` block."""
    saved = [blocks._modules[str(i)] for i in range(layer)]
    try:
        for i in range(layer):
            blocks._modules[str(i)] = Passthrough(tuple_len)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks._modules[str(i)] = block
