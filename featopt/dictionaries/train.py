"""SAE training as a LightningModule over streamed activations; several SAEs from one pass.

Every SAE of a run (several dictionary sizes, several sites) is fed from the same activations,
so the model's forward, the expensive part, is paid once. Each SAE's loss is its architecture's
(`SparseAutoencoder.training_loss`, sparsify's conventions, which put every term on the scale of
a fraction of variance):

- all: `fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over the global batch; relu adds
  `l1 * sum_i z_i ||W_dec[i]|| / sum ||x - mean(x)||^2`;
- topk: `+ auxk_alpha * AuxK` (dead latents, unseen for `dead_tokens` tokens, reconstruct the
  residual with their top `d_in / 2` pre-activations, as in OpenAI's and sparsify's recipe).

Inputs are scaled by a per-site constant so that their mean squared norm is `d_in` (measured on
the first buffer); the scale is folded into the weights when an SAE is saved, so saved SAEs read
raw activations. Decoder rows stay at unit norm (relu, topk); b_dec starts at the data mean.

The optimizer is adam or sparsify's schedule-free signum (`optimizers.py`). Schedule-free trains
at a point `y` and evaluates at an average `x`: `export` (hence the held-out evaluations) reads
`x` without moving the weights, checkpoints hold `y` with `z` in the optimizer's state (what a
resumed run steps from), and at the end of training the weights move to `x`. As in sparsify, the
unit norm is kept at `y`, where the gradients are taken; `x` is only close to it.

`distribute=True` divides the SAEs among the ranks, each training its own on the whole global batch
(`distribute.py`); with `model_device` the model's forward overlaps the SAE steps (`prefetch.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from featopt.dictionaries import distribute as dist_saes
from featopt.dictionaries.activations import ActivationStream
from featopt.dictionaries.prefetch import Prefetching
from featopt.dictionaries.optimizers import ScheduleFree, build, default_lr, evaluation_point
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, parse_site
from featopt.models.sae import LossTerms, SAEConfig, SparseAutoencoder
from featopt.runs.handle import ModelHandle


def _local(t: Tensor, op: str = "sum") -> Tensor:
    """No reduction: a distributed SAE's owner sees the whole global batch."""
    return t


class SAETraining(L.LightningModule):
    """Trains `saes` (each reading `sites[i]`) on an :class:`ActivationStream`.

    Args:
        configs: one :class:`SAEConfig` per SAE (its `hook_name` is the site it reads).
        model: the adapter, a loader called in each worker, or a
            :class:`~featopt.runs.handle.ModelHandle`; None when training from a cache.
        make_source: `(adapter or None) -> source` for the stream (see `activations.py`).
        n_contexts, context_length: the training contexts.
        batch_tokens, buffer_batches, skip_first, seed: the stream's settings.
        optimizer: "adam" or "signum" (see `optimizers.py`).
        lrs: learning rate per SAE (default: the optimizer's `default_lr`); warmup_steps,
            decay_fraction: adam's schedule (linear warm-up, constant, linear decay to 0 over the
            last fraction of the steps); signum has none.
        l1, auxk_alpha, dead_tokens: the sparsity terms (see the module docstring).
        distribute: on several ranks, divide the SAEs among them instead of replicating them
            (then the strategy must leave the module unwrapped: `runs.lightning.UnwrappedDDPStrategy`).
        model_device: the model's device, its next buffer computed during SAE steps (`prefetch.py`).
    """

    def __init__(
        self, configs: list[SAEConfig], model: ModelAdapter | Callable[[], ModelAdapter] | ModelHandle | None,
        make_source: Callable, *, n_contexts: int, context_length: int, batch_tokens: int,
        buffer_batches: int = 16, skip_first: int = 1, seed: int = 0, lrs: list[float] | None = None,
        warmup_steps: int = 50, decay_fraction: float = 0.2, l1: float = 1.0, auxk_alpha: float = 1 / 32,
        dead_tokens: int = 1_000_000, normalize: bool = True, optimizer: str = "adam", l0_coef: float = 1.0,
        bandwidth: float = 0.05, distribute: bool = False, model_device: str | None = None,
    ):
        super().__init__()
        # Distributed, each rank builds its own SAEs in `setup`, so none allocates them all here.
        with torch.device("meta") if distribute else contextlib.nullcontext():
            self.saes = nn.ModuleList(SparseAutoencoder(cfg) for cfg in configs)
        self.register_load_state_dict_pre_hook(dist_saes.build_for_load)
        self.sites = [parse_site(c.hook_name) for c in configs]
        # what each reconstructs: its own site, or a transcoder's target site
        self.targets = [parse_site(c.target_hook_name) if c.target_hook_name else site for c, site in zip(configs, self.sites)]
        self.site_list = list(dict.fromkeys(self.sites + self.targets))
        self.optimizer = optimizer
        self.lrs = lrs or [default_lr(optimizer, c.d_sae) for c in configs]
        self.make_source = make_source
        self.stream_args = dict(n_contexts=n_contexts, context_length=context_length, batch_tokens=batch_tokens,
                                buffer_batches=buffer_batches, seed=seed, skip_first=skip_first)
        self.seed, self.warmup_steps, self.decay_fraction = seed, warmup_steps, decay_fraction
        self.l1, self.auxk_alpha, self.dead_tokens, self.normalize = l1, auxk_alpha, dead_tokens, normalize
        self.l0_coef, self.bandwidth = l0_coef, bandwidth
        self.handle = ModelHandle.of(model)
        self.distribute, self.model_device = distribute, model_device
        self.owned = list(range(len(configs)))  # the SAEs this rank trains (setup divides them when distributed)
        self.owners = [0] * len(configs)
        # State that a checkpoint must carry besides the weights.
        self.register_buffer("scales", torch.ones(len(self.site_list)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        for i, cfg in enumerate(configs):
            self.register_buffer(f"since_fired_{i}", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.stream: ActivationStream | None = None
        self._tokens_seen, self._t0 = 0, None
        self._optimizer = None  # the one configure_optimizers built (unwrapped by Lightning)

    # ----------------------------------------------------------------- model and data
    def __getstate__(self):
        state = super().__getstate__()
        state["stream"] = None  # each worker makes its own (the model's handle travels as a recipe)
        state["_optimizer"] = None  # and its own optimizer
        return state

    @property
    def adapter(self) -> ModelAdapter | None:
        return None if self.handle is None else self.handle.adapter

    def setup(self, stage: str) -> None:
        if self.adapter is not None:
            self.adapter.to(self.model_device or self.device)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        source = self.make_source(self.adapter)
        source = Prefetching(source) if self.model_device and self.adapter is not None else source
        self.stream = ActivationStream(source, world=world, rank=rank, **self.stream_args)
        if self._spread:
            dist_saes.divide(self, world, rank)
        dist_saes.build(self, self.owned)

    @property
    def _spread(self) -> bool:
        """Whether the SAEs are divided among several ranks."""
        return self.distribute and self.trainer is not None and self.trainer.world_size > 1

    def _global(self, t: Tensor, op: str = "sum") -> Tensor:
        """The sum (or "min") of `t` over all ranks (a no-op on one)."""
        if self.trainer.world_size == 1:
            return t
        if op == "min":
            t = t.clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            return t
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")

    @torch.no_grad()
    def _initialize(self) -> None:
        """Scales from the first buffer (mean squared norm -> d_in) and b_dec at the data mean."""
        batches = [self.stream.batch(i) for i in range(self.stream.buffer_batches)]
        means = {}
        for s, site in enumerate(self.site_list):
            x = torch.cat([b[site] for b in batches]).double()
            stats = self._global(torch.stack([x.pow(2).sum(), torch.tensor(float(len(x)), dtype=torch.float64)]).to(self.device))
            sums = self._global(x.sum(0).to(self.device))
            if self.normalize:
                self.scales[s] = math.sqrt(x.shape[1] / float(stats[0] / stats[1]))
            means[site] = (sums / stats[1]).float().cpu() * float(self.scales[s])
        for i in self.owned:
            sae = self.saes[i]
            gen = torch.Generator().manual_seed(self.seed * 1_009 + i)
            sae.init_weights(gen, data_mean=means[self.targets[i]], input_mean=means[self.sites[i]])
        self.initialized.fill_(True)

    def on_train_start(self) -> None:
        if not bool(self.initialized):
            self._initialize()
        self._t0, self._tokens_seen = time.perf_counter(), 0

    # ----------------------------------------------------------------- one step
    def _losses(self, i: int, sae: SparseAutoencoder, x: Tensor, y: Tensor | None, total_var: Tensor) -> tuple[Tensor, dict]:
        """Loss of SAE i on this rank's rows `x [n, d_in]` against targets `y` (None: `x`), a sum
        over rows as a share of the global batch, and its statistics: its architecture's `training_loss`."""
        dead = getattr(self, f"since_fired_{i}") >= self.dead_tokens
        terms = LossTerms(l1=self.l1, auxk_alpha=self.auxk_alpha, l0_coef=self.l0_coef, bandwidth=self.bandwidth,
                          dead=dead, count=self._logs_this_step())
        return sae.training_loss(x, total_var, terms, y)

    def training_step(self, batch, batch_idx) -> Tensor:
        step = self.global_step
        acts = self.stream.batch(step)
        n_global = self.stream.batch_tokens
        world = self.trainer.world_size
        # Replicated SAEs see this rank's rows and sum their statistics over ranks; distributed
        # ones see the whole global batch (exchanged) and sum nothing.
        reduce = self._global
        if self._spread:
            acts = dist_saes.exchange({site: a.to(self.device) for site, a in acts.items()},
                                      self.stream.batch_ranks(step).to(self.device), self.site_needs)
            reduce = _local
        inputs, total_vars = {}, {}
        for s, site in enumerate(self.site_list):
            if site not in acts:  # read only by other ranks' SAEs
                continue
            x = acts[site].to(self.device) * self.scales[s]
            # float64 sums (the variance is a difference of them), without a float64 copy of x
            moments = torch.cat([x.sum(0).double(), x.pow(2).sum(dtype=torch.float64)[None]])
            moments = reduce(moments.detach())
            mean = moments[:-1] / n_global
            total_vars[site] = (moments[-1] - n_global * mean.pow(2).sum()).float().clamp_min(1e-12)
            inputs[site] = x
        loss = torch.zeros((), device=self.device)
        # every SAE's statistics, 0 where another rank trains it (so that a sum over ranks gives them)
        fvus = torch.zeros(len(self.saes), device=self.device)
        l0s = torch.zeros(len(self.saes), dtype=torch.float64, device=self.device)
        fired = []
        for i in self.owned:
            sae, site, target = self.saes[i], self.sites[i], self.targets[i]
            part, stats = self._losses(i, sae, inputs[site], inputs[target] if target != site else None, total_vars[target])
            stats["steps"] = self.trainer.max_steps  # the run's length sets batchtopk's threshold rate
            sae.observe_batch(stats, reduce)
            loss = loss + part
            fvus[i] = (stats["fvu"] / total_vars[target]).detach()
            l0s[i] = stats["l0"]
            fired.append(stats["fired"])
        # Which latents fired anywhere in the global batch: the same dead set on every rank.
        flat = reduce(torch.cat(fired).float()) > 0
        start = 0
        for i in self.owned:
            since = getattr(self, f"since_fired_{i}")
            since += n_global
            since[flat[start:start + self.saes[i].d_sae]] = 0
            start += self.saes[i].d_sae
        self._log_step(fvus, l0s, n_global)
        # DDP averages gradients over ranks; each rank's loss is its share of a global sum. A
        # distributed SAE's loss is the whole sum, and nothing averages it.
        return loss if self._spread else loss * world

    def _log_step(self, fvus: Tensor, l0s: Tensor, n_global: int) -> None:
        """Log every SAE's FVU and L0 (`[n_saes]`, this rank's part) and dead fraction."""
        self._tokens_seen += n_global
        if not self._logs_this_step():
            return
        fvu = self._global(fvus)
        l0 = self._global(l0s) / n_global
        dead = torch.zeros(len(self.saes), device=self.device)
        for i in self.owned:
            dead[i] = (getattr(self, f"since_fired_{i}") >= self.dead_tokens).float().mean()
        if self._spread:  # each SAE's counters are its owner's
            dead = self._global(dead)
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        if elapsed > 0:
            self.log("tok/s", self._tokens_seen / elapsed, prog_bar=True, rank_zero_only=True)
        for i, sae in enumerate(self.saes):
            name = self.sae_name(i)
            self.log(f"train/fvu/{name}", fvu[i].float(), prog_bar=len(self.saes) == 1, rank_zero_only=True)
            self.log(f"train/l0/{name}", l0[i].float(), prog_bar=len(self.saes) == 1, rank_zero_only=True)
            self.log(f"train/dead_fraction/{name}", dead[i], rank_zero_only=True)

    def _logs_this_step(self) -> bool:
        every = max(1, self.trainer.log_every_n_steps)
        return self.global_step % every == 0 or self.global_step + 1 == self.trainer.max_steps

    def sae_name(self, i: int) -> str:
        sae = self.saes[i]
        return f"{sae.cfg.hook_name}-{sae.cfg.architecture}-{sae.d_sae}{sae.label()}"

    # ----------------------------------------------------------------- optimization
    def on_before_optimizer_step(self, optimizer) -> None:
        for sae in map(self.saes.__getitem__, self.owned):
            if sae.unit_decoder and not sae.is_transcoder:  # transcoders: free rows, as sparsify's
                sae.remove_parallel_grads()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for sae in map(self.saes.__getitem__, self.owned):
            if sae.unit_decoder and not sae.is_transcoder:
                sae.normalize_decoder()
            sae.after_step()

    def configure_optimizers(self):
        # parameters learned otherwise (batchtopk's threshold, a running average) stay out
        groups = [{"params": [p for p in self.saes[i].parameters() if p.requires_grad], "lr": self.lrs[i]} for i in self.owned]
        conf = build(self.optimizer, groups, total_steps=self.trainer.max_steps, warmup_steps=self.warmup_steps,
                     decay_fraction=self.decay_fraction)
        self._optimizer = conf["optimizer"]
        return conf

    def on_train_end(self) -> None:
        # Schedule-free: the weights move from y to x for whoever reads them now (the main process after
        # ddp_spawn, callers of `saes`); the callbacks' checkpoints, saved before this, hold y, as a resume expects.
        if isinstance(self._optimizer, ScheduleFree):
            self._optimizer.eval()
        getattr(self.stream.source, "close", lambda: None)()  # a prefetch in flight ends before the model is used
        if self._spread:  # rank 0 takes every SAE (on the CPU), to export and save them
            dist_saes.gather_saes(self)

    def gathered_exports(self) -> list[SparseAutoencoder] | None:
        """Every SAE as :meth:`export` gives it, on rank 0 (None elsewhere); collective when the
        SAEs are distributed (every rank must call it)."""
        if not self._spread:
            return [self.export(i) for i in range(len(self.saes))] if self.trainer.is_global_zero else None
        return dist_saes.gathered_exports(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sae_optimizer"] = self.optimizer
        if self._spread:  # a checkpoint as one process writes it (collective: every rank saves)
            dist_saes.gather_checkpoint(checkpoint, self.owned, dist_saes.own_states(self))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Another optimizer's state would load without complaint and step wrongly.
        theirs = checkpoint.get("sae_optimizer", "adam")  # checkpoints from before signum: adam
        if theirs != self.optimizer:
            raise FeatoptError(f"--resume {str(self.trainer.ckpt_path)!r} was trained with --optimizer {theirs}, not "
                               f"{self.optimizer}: give --optimizer {theirs} to resume it.")
        if self._spread:  # this rank's SAEs, optimizer groups and schedule from a one-process layout
            dist_saes.localize_checkpoint(checkpoint, self.owned, self.state_dict(), dist_saes.released(self))

    # ----------------------------------------------------------------- results
    def export(self, i: int) -> SparseAutoencoder:
        """SAE i for raw activations: a copy of its evaluation point (schedule-free's `x`) with
        the input scale folded into its weights, named by its site's TransformerLens hook name
        (what SAELens expects)."""
        sae = self.saes[i]
        target = self.targets[i].tl_name if sae.is_transcoder else ""
        out = SparseAutoencoder(dataclasses.replace(sae.cfg, hook_name=self.sites[i].tl_name, target_hook_name=target,
                                                    metadata=dict(sae.cfg.metadata)))
        points = {name: evaluation_point(self._optimizer, p) for name, p in sae.named_parameters()}
        out.load_state_dict({k: points.get(k, v).detach().float().cpu() for k, v in sae.state_dict().items()})
        out.fold_scale(*(float(self.scales[self.site_list.index(site)]) for site in (self.sites[i], self.targets[i])))
        return out


class HeldOutEval(L.Callback):
    """Every `every` steps, rank 0 evaluates the SAEs as they are on held-out contexts `[N, T]`
    (FVU, L0, dead fraction, CE loss recovered; see `evaluate.py`) and logs them as `eval/...`."""

    def __init__(self, contexts: Tensor, every: int, *, skip_first: int = 1, ce: bool = True):
        self.contexts, self.every, self.skip_first, self.ce = contexts, every, skip_first, ce

    def on_train_batch_end(self, trainer, module: SAETraining, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every or step % self.every or module.adapter is None:
            return
        from featopt.dictionaries.evaluate import evaluate

        getattr(module.stream.source, "wait", lambda: None)()  # no prefetched forward holds the model's hooks
        saes = module.gathered_exports()  # every rank takes part when the SAEs are distributed
        if not trainer.is_global_zero:
            return
        saes = [sae.to(module.device) for sae in saes]
        rows = evaluate(module.adapter, saes, self.contexts.to(module.device), skip_first=self.skip_first, ce=self.ce)
        for i, row in enumerate(rows):
            for key in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_div"):
                if key in row and isinstance(row[key], float):
                    for logger in trainer.loggers:
                        logger.log_metrics({f"eval/{key}/{module.sae_name(i)}": row[key]}, step=step)

