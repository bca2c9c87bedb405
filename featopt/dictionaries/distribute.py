"""SAEs divided among ranks (`featopt sae train --distribute_modules`, as sparsify's option).

Every rank runs the model on its share of each global batch's contexts, as under DDP; then the
rows of each site go to the ranks that own an SAE reading it (:func:`exchange`), so that an owner
trains its SAEs on the whole global batch, alone: no gradient is averaged and no other rank holds
their weights (:func:`release` leaves empty tensors in their place). Rank 0 gathers them for a
checkpoint (which has the layout of a one-process run's, so either kind of run resumes it) and at
the end of training (:func:`gather_saes`), so that it exports and saves them as one process does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from featopt.models import Site
from featopt.models.sae import SparseAutoencoder


def assign_owners(sizes: Sequence[int], world: int) -> list[int]:
    """The rank owning each SAE: the largest first, each to the rank with the fewest parameters so
    far (the lowest rank on a tie), so that every rank gets one when there are at least `world`."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


# ----------------------------------------------------------------- a module's SAEs among ranks
# `module` is an `SAETraining`: `saes`, `sites`, `targets`, `since_fired_<i>`, `owned`, `owners`.
def divide(module, world: int, rank: int) -> None:
    """Give `module` its share of the SAEs (`owned`, by :func:`assign_owners`), release the others,
    and note the sites each rank reads (`site_needs`, for :func:`exchange`)."""
    module.owners = assign_owners([sum(p.numel() for p in sae.parameters()) for sae in module.saes], world)
    module.owned = [i for i, r in enumerate(module.owners) if r == rank]
    for i in released_indices(module):
        release(module.saes[i])
    build(module, module.owned)
    module.site_needs = [list(dict.fromkeys(s for i, r in enumerate(module.owners) if r == q
                                        for s in (module.sites[i], module.targets[i]))) for q in range(world)]


def build(module, indices: Sequence[int]) -> None:
    """Build SAEs `indices` of `module` on the CPU where they were left on the meta device
    (`SAETraining(distribute=True)` allocates none until it knows which are its own)."""
    for i in indices:
        if any(p.is_meta for p in module.saes[i].parameters()):
            module.saes[i] = SparseAutoencoder(module.saes[i].cfg)


def build_for_load(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: build the meta SAEs that `state_dict` holds weights of (the
    main process of ddp_spawn takes rank 0's SAEs so)."""
    build(module, [i for i in range(len(module.saes)) if any(
        v.numel() for k, v in state_dict.items() if k.startswith(f"{prefix}saes.{i}."))])


def released_indices(module) -> list[int]:
    return [i for i in range(len(module.saes)) if i not in module.owned]


def released(module) -> list[str]:
    """The state-dict prefixes of the SAEs this rank does not hold."""
    return [f"saes.{i}." for i in released_indices(module)]


def own_states(module) -> dict[str, Tensor]:
    """The state entries of this rank's SAEs and of their dead-latent counters."""
    out = {f"saes.{i}.{k}": v for i in module.owned for k, v in module.saes[i].state_dict().items()}
    return out | {f"since_fired_{i}": getattr(module, f"since_fired_{i}") for i in module.owned}


def gather_saes(module) -> None:
    """Every SAE and counter into rank 0's `module` from its owner (collective); those it did
    not own arrive on the CPU."""
    parts = gather_to_zero(own_states(module))
    for part in parts or []:
        for i in set(released_indices(module)) & {int(k.split(".")[1]) for k in part if k.startswith("saes.")}:
            prefix = f"saes.{i}."
            materialize(module.saes[i], {k[len(prefix):]: v for k, v in part.items() if k.startswith(prefix)})
        for k, v in part.items():
            if k.startswith("since_fired_"):
                getattr(module, k).copy_(v)


def gathered_exports(module) -> list | None:
    """`module.export(i)` of every SAE, on rank 0 from its owner (collective); None elsewhere."""
    parts = gather_to_zero({i: (sae.cfg, sae.state_dict()) for i in module.owned for sae in [module.export(i)]})
    if parts is None:
        return None
    exports = {}
    for part in parts:
        for i, (cfg, state) in part.items():
            exports[i] = SparseAutoencoder(cfg)
            exports[i].load_state_dict(state)
    return [exports[i] for i in range(len(module.saes))]


def release(module: nn.Module) -> None:
    """Replace every parameter and buffer of `module` by an empty CPU tensor (a rank that does not
    own it keeps its structure, names and config, not its memory)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = torch.empty(0, dtype=b.dtype)


def materialize(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Fill a released `module` from its `state_dict()` values `state` (kept where they are, on the CPU)."""
    for name, value in state.items():
        sub_name, _, leaf = name.rpartition(".")
        sub = module.get_submodule(sub_name)
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(value, requires_grad=sub._parameters[leaf].requires_grad)
        else:
            sub._buffers[leaf] = value


def exchange(local: dict[Site, Tensor], ranks: Tensor, needs: Sequence[Sequence[Site]]) -> dict[Site, Tensor]:
    """Every site this rank needs, over the whole global batch.

    Args:
        local: this rank's rows `{site: [n_r, d]}` (every site of the run, on the device used for
            communication: the GPU under nccl).
        ranks: `[B]` the rank each row of the global batch comes from (`ActivationStream.batch_ranks`).
        needs: the sites each rank reads (`needs[q]` for rank q), the same list on every rank.

    Returns `{site: [B, d]}` for `needs[rank]`, rows in the global batch's order. nccl exchanges by
    `all_to_all`; gloo's needs equal sizes, so there it is point-to-point sends (the same pairs).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = torch.bincount(ranks, minlength=world).tolist()
    ref = next(iter(local.values()))
    widths = {site: a.shape[1] for site, a in local.items()}
    send = [torch.cat([local[s] for s in needs[q]], 1) if needs[q] else ref.new_empty(counts[rank], 0)
            for q in range(world)]
    mine = sum(widths[s] for s in needs[rank])
    recv = [ref.new_empty(counts[s], mine) for s in range(world)]
    if dist.get_backend() == "gloo":
        ops = []
        for q in range(world):
            if q == rank:
                recv[q].copy_(send[q])
                continue
            if send[q].numel():  # both sides know every size: empty messages are left out on both
                ops.append(dist.P2POp(dist.isend, send[q].contiguous(), q))
            if recv[q].numel():
                ops.append(dist.P2POp(dist.irecv, recv[q], q))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
    else:
        dist.all_to_all(recv, [t.contiguous() for t in send])
    out, start = {}, 0
    for site in needs[rank]:
        full = ref.new_empty(len(ranks), widths[site])
        for s in range(world):
            full[ranks == s] = recv[s][:, start:start + widths[site]]
        out[site] = full
        start += widths[site]
    return out


def gather_to_zero(part):
    """Every rank's picklable `part` (tensors anywhere in dicts, lists and tuples) on rank 0, a list
    by rank with every tensor on the CPU; None on the others. The tensors travel one at a time by
    point-to-point sends (on the GPU under nccl), so that rank 0 never holds more than one of them
    on its device (`gather_object` would pickle them all and pad every part to the largest)."""
    tensors: list[Tensor] = []
    skeleton = _strip(part, tensors)
    rank = dist.get_rank()
    skeletons = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(skeleton, skeletons, dst=0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank != 0:
        for t in tensors:
            if t.numel():
                dist.send(t.detach().to(device).contiguous(), dst=0)
        return None
    out = []
    for r, sk in enumerate(skeletons):
        if r == 0:
            received = [t.detach().cpu() for t in tensors]
        else:
            received = []
            for shape, dtype in _slots(sk):
                buf = torch.empty(shape, dtype=dtype, device=device)
                if buf.numel():
                    dist.recv(buf, src=r)
                received.append(buf.cpu())
        out.append(_fill(sk, received))
    return out


class _Slot(tuple):
    """Where a tensor was in a gathered part: `(index, shape, dtype)`."""


def _strip(value, tensors: list):
    if isinstance(value, Tensor):
        tensors.append(value)
        return _Slot((len(tensors) - 1, tuple(value.shape), value.dtype))
    if isinstance(value, dict):
        return {k: _strip(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(v, tensors) for v in value)
    return value


def _slots(skeleton) -> list[tuple]:
    """`(shape, dtype)` of a skeleton's tensors, in order."""
    found: list[_Slot] = []

    def walk(value):
        if isinstance(value, _Slot):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
    walk(skeleton)
    return [(shape, dtype) for _, shape, dtype in sorted(found, key=lambda s: s[0])]


def _fill(skeleton, tensors: list[Tensor]):
    if isinstance(skeleton, _Slot):
        return tensors[skeleton[0]]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


# ----------------------------------------------------------------- optimizer and schedule states
# A run's optimizer has one param group per SAE (the SAE's order); a rank's, one per SAE it owns.
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")  # a scheduler's lists with an entry per group


def merge_optimizer(parts: Sequence[tuple[Sequence[int], dict]]) -> dict:
    """One optimizer `state_dict` with a group per SAE, from each rank's `(owned SAEs, state_dict)`."""
    groups = {}
    for owned, sd in parts:
        for i, group in zip(owned, sd["param_groups"]):
            groups[i] = (group, {p: sd["state"][p] for p in group["params"] if p in sd["state"]})
    out_groups, out_state, n = [], {}, 0
    for i in sorted(groups):
        group, state = groups[i]
        ids = list(range(n, n + len(group["params"])))
        out_state.update({new: state[old] for old, new in zip(group["params"], ids) if old in state})
        out_groups.append({**group, "params": ids})
        n += len(ids)
    return {"state": out_state, "param_groups": out_groups}


def split_optimizer(full: dict, owned: Sequence[int]) -> dict:
    """The `state_dict` of a rank owning SAEs `owned`, from a one-group-per-SAE `full` one."""
    groups, state, n = [], {}, 0
    for i in owned:
        group = full["param_groups"][i]
        ids = list(range(n, n + len(group["params"])))
        state.update({new: full["state"][old] for old, new in zip(group["params"], ids) if old in full["state"]})
        groups.append({**group, "params": ids})
        n += len(ids)
    return {"state": state, "param_groups": groups}


def merge_scheduler(parts: Sequence[tuple[Sequence[int], dict]]) -> dict:
    """One scheduler `state_dict` from each rank's `(owned SAEs, state_dict)` (its per-group lists in SAE order)."""
    out = dict(parts[0][1])
    for key in _PER_GROUP:
        if key in out:
            entries = {i: v for owned, sd in parts for i, v in zip(owned, sd[key])}
            out[key] = [entries[i] for i in sorted(entries)]
    return out


def split_scheduler(full: dict, owned: Sequence[int]) -> dict:
    return {k: [v[i] for i in owned] if k in _PER_GROUP else v for k, v in full.items()}


def gather_checkpoint(checkpoint: dict, owned: Sequence[int], states: dict[str, Tensor]) -> None:
    """Turn each rank's `checkpoint` into a one-process run's on rank 0 (collective; the others'
    are not written): the weights and counters `states` of every rank's SAEs, and one optimizer
    and schedule with a group per SAE."""
    optimizers = checkpoint.get("optimizer_states", [])
    schedulers = [s for s in checkpoint.get("lr_schedulers", [])]
    parts = gather_to_zero((list(owned), states, optimizers, schedulers))
    if parts is None:
        return
    for _, part_states, _, _ in parts:
        checkpoint["state_dict"].update(part_states)
    if optimizers:
        checkpoint["optimizer_states"] = [merge_optimizer([(p[0], p[2][k]) for p in parts]) for k in range(len(optimizers))]
    if schedulers:
        checkpoint["lr_schedulers"] = [merge_scheduler([(p[0], p[3][k]) for p in parts]) for k in range(len(schedulers))]


def localize_checkpoint(checkpoint: dict, owned: Sequence[int], own_state: dict[str, Tensor], released: Sequence[str]) -> None:
    """Turn a one-process run's `checkpoint` into this rank's: the released entries `released`
    (prefixes of SAEs it does not own) take its own empty tensors from `own_state`, and the
    optimizer and schedule keep only the groups of its SAEs `owned`."""
    state = checkpoint["state_dict"]
    for key in state:
        if key.startswith(tuple(released)):
            state[key] = own_state[key]
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = [split_optimizer(o, owned) for o in checkpoint["optimizer_states"]]
    if "lr_schedulers" in checkpoint:
        checkpoint["lr_schedulers"] = [split_scheduler(s, owned) for s in checkpoint["lr_schedulers"]]
