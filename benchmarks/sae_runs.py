"""What the SAE training benchmarks share: timing featopt's stream and step, training one featopt
SAE or one peer's (in the peer's own environment), and reading any saved SAE back for featopt's
`evaluate`. Imported by `bench_sae.py` and `bench_sae_archs.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from featopt.errors import FeatoptError

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"saelens": ("sae-lens", "saelens_train.py"), "sparsify": ("sparsify", "sparsify_train.py")}
LAYER, CONTEXT, BATCH, K, EXPANSION = 6, 128, 4096, 32, 4
SITE = f"blocks.{LAYER}.resid_post"


def quiet() -> None:
    """Lightning's and the libraries' chatter off: the benchmarks print their own lines."""
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; quiet them after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- timing featopt
class FeatoptTimers:
    """For the duration of a `with` block, times featopt's training in three parts that do not
    overlap: `forward_s`, the model forward of the stream (`ModelSource.__call__`); `buffer_s`, the
    rest of drawing each batch from the shuffling buffer (`ActivationStream.batch`: the buffer's
    reshaping at a refill, the row gather; a cache's reads); `step_s`, the SAE step
    (`SAETraining.optimizer_step`: the SAE's forward, loss, backward, the optimizer and the decoder
    renormalisation), less the batch drawn inside it. The peers' SAE-step timers likewise start
    from a batch in hand."""

    def __enter__(self):
        from featopt.dictionaries.activations import ActivationStream, ModelSource
        from featopt.dictionaries.train import SAETraining

        self.forward_s = self.buffer_s = self.step_s = 0.0
        self.forward_contexts = 0
        self._saved = (ModelSource.__call__, ActivationStream.batch, SAETraining.optimizer_step)
        source_call, draw, optimizer_step = self._saved
        timers = self

        @functools.wraps(source_call)
        def timed_source(source, index):
            start = time.perf_counter()
            try:
                return source_call(source, index)
            finally:
                timers.forward_s += time.perf_counter() - start
                timers.forward_contexts += len(index)

        @functools.wraps(draw)
        def timed_batch(stream, step):
            start, forward_before = time.perf_counter(), timers.forward_s
            try:
                return draw(stream, step)
            finally:
                timers.buffer_s += (time.perf_counter() - start) - (timers.forward_s - forward_before)

        @functools.wraps(optimizer_step)
        def timed_step(module, *args, **kwargs):
            start, before = time.perf_counter(), timers.forward_s + timers.buffer_s
            try:
                return optimizer_step(module, *args, **kwargs)
            finally:  # the batch drawn inside the step (and any refill) is not SAE time
                timers.step_s += (time.perf_counter() - start) - (timers.forward_s + timers.buffer_s - before)

        ModelSource.__call__, ActivationStream.batch, SAETraining.optimizer_step = timed_source, timed_batch, timed_step
        return self

    def __exit__(self, *exc):
        from featopt.dictionaries.activations import ActivationStream, ModelSource
        from featopt.dictionaries.train import SAETraining

        ModelSource.__call__, ActivationStream.batch, SAETraining.optimizer_step = self._saved


def memoize_contexts() -> None:
    """Tokenize the corpus once per process: `train` and `cache` (`featopt.commands.sae_train`) look
    `corpus_contexts` up in `featopt.data` when called, so this keeps tokenizing out of every timed
    run (the peers get their contexts ready-made too)."""
    import inspect

    import featopt.data

    original = featopt.data.corpus_contexts
    signature = inspect.signature(original)
    memo: dict = {}

    @functools.wraps(original)
    def cached(tokenizer, path, context_length, **kwargs):
        bound = signature.bind(tokenizer, path, context_length, **kwargs)
        bound.apply_defaults()
        key = (id(tokenizer), str(path), context_length, tuple(sorted(bound.kwargs.items())))
        if key not in memo:
            memo[key] = original(tokenizer, path, context_length, **kwargs)
        return memo[key]

    featopt.data.corpus_contexts = cached


def featopt_train(adapter, args, out: Path, *, label: str = "featopt", activations: str | None = None, **settings) -> dict:
    """Train featopt SAE(s) into `out` with `sae train`'s defaults but for `settings` (TrainConfig
    fields: architecture, k, optimizer, ...), from the model or from the cache `activations`; the
    row: wall time (loading the model excluded), forward and SAE-step seconds, where it was saved."""
    from featopt.commands.sae_train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    settings = {"architecture": "topk", "expansion": str(EXPANSION), "k": K, **settings}
    config = TrainConfig(model=args.model, site=SITE, corpus=None if activations else args.corpus, activations=activations,
                         tokens=args.tokens, batch_size=BATCH, context_length=CONTEXT, eval_contexts=0, seed=args.seed,
                         progress=False, out=str(out), **settings)
    with FeatoptTimers() as t:
        start = time.perf_counter()
        run = train(config, adapter=adapter)
        wall = time.perf_counter() - start
    tokens = json.loads((run.out / "training.json").read_text())["run"]["tokens"]
    import featopt

    return {"library": label, "version": getattr(featopt, "__version__", "dev"), "tokens": tokens,
            "steps": -(-args.tokens // BATCH), "wall_s": wall, "tokens_per_s": tokens / wall, "forward_s": t.forward_s,
            "sae_step_s": t.step_s, "buffer_s": t.buffer_s, "other_s": wall - t.forward_s - t.step_s, "forward_tokens": t.forward_contexts * CONTEXT,
            "threads": torch.get_num_threads(), "from": "cache" if activations else "model", "settings": settings,
            "out": str(run.paths[0] if len(run.paths) == 1 else run.out), "paths": [str(p) for p in run.paths]}


# ----------------------------------------------------------------------------- peers
def peer_train(name: str, model_dir: Path, contexts: Path, args, out: Path, extra: list[str] = ()) -> dict:
    """Run peer `name`'s runner (`benchmarks/peers/<name>_train.py`) in its environment into `out`,
    with `extra` flags; its JSON row, kept as `<out>.row.json` (with `--resume`, an existing row
    is read back instead of training again: the runner's own output, not a re-measurement)."""
    row_file = out.parent / f"{out.name}.row.json"
    if getattr(args, "resume", False) and row_file.exists():
        print(f"[{out.name}] reusing {row_file}", flush=True)
        return json.loads(row_file.read_text())
    env_name, script = PEERS[name]
    python = ROOT / "benchmarks" / ".peers" / env_name / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: make the peer environments first (benchmarks/README.md, 'Peer environments').")
    cmd = [str(python), str(ROOT / "benchmarks" / "peers" / script), "--model_dir", str(model_dir), "--contexts", str(contexts),
           "--tokens", str(args.tokens), "--out", str(out), "--layer", str(LAYER), "--expansion", str(EXPANSION),
           "--k", str(K), "--batch_size", str(BATCH), "--seed", str(args.seed), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[{out.name}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = out.parent / f"{out.name}.log"
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"[{out.name}] failed (exit {proc.returncode}); log: {log}\n{tail}")
    row = json.loads(lines[-1])
    row["command"] = " ".join(cmd)
    row_file.write_text(json.dumps(row, indent=2))
    return row


# ----------------------------------------------------------------------------- evaluation
def load_for_eval(path: str, adapter, out: Path, notes: list[str]):
    """featopt's `load_sae`; where it refuses a peer's file or its hook name, say so and work around."""
    from featopt.models.sae.formats import load_sae, site_of

    try:
        sae = load_sae(path)
    except FeatoptError as error:
        if "rescale_acts_by_decoder_norm" not in str(error):
            raise
        # sae-lens folds the decoder norms into the saved weights (unit-norm rows) but keeps the flag
        # in cfg.json; with unit rows the flag changes nothing, so read a copy with it cleared.
        from safetensors.torch import load_file

        norms = load_file(str(Path(path) / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
        gap = float((norms - 1).abs().max())
        if gap > 1e-4:
            raise
        copy = out / f"{Path(path).name}-flag-cleared"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        cfg = json.loads((copy / "cfg.json").read_text())
        cfg["rescale_acts_by_decoder_norm"] = False
        (copy / "cfg.json").write_text(json.dumps(cfg))
        sae = load_sae(copy)
        notes.append(f"load_sae({path}) refused it ({error}); its decoder rows are unit norm (max |norm - 1| = "
                     f"{gap:.1e}), so the flag is a no-op: evaluated a copy with it cleared ({copy}).")
    try:
        adapter.site(sae.cfg.hook_name)
    except FeatoptError:
        site = site_of(sae.cfg.hook_name)
        notes.append(f"{path}: hook name {sae.cfg.hook_name!r} is not a site `evaluate` accepts; "
                     f"renamed to {site!r} with featopt.models.sae.formats.site_of.")
        sae.cfg.hook_name = site
    return sae
