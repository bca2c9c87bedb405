"""The `featopt sae ...` commands that read what latents mean (source document 002): `features`
(corpus statistics of every latent, one pass), `lens` (logit lens), `ablate` (ablated text and
direction ablation) and `mcs` (max cosine similarity between dictionaries). Each is a flat config
dataclass and a `run_*` function; each writes a JSON record (and tensors where they are large)
with the run's settings, the SAE's hash and the versions, so a notebook gets the numbers the
dashboard (`featopt.commands.sae_dashboard`) shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter, load_model, model_options
from featopt.results import atomic_write, versions
from featopt.commands.sae_train import _check_context, _check_positive, _out, bos_id
from featopt.discrete.common import DTYPES


# ----------------------------------------------------------------------------- shared
def load_model_and_sae(model: str, sae_path: str, dtype: str, adapter: ModelAdapter | None = None, **options):
    """`(adapter, sae)`: the model and the SAE at `sae_path`, checked to fit each other; `options`
    are :func:`~featopt.models.model_options` of the command's config (a given `adapter` is
    seen with their `bos`)."""
    from featopt.models.sae.attach import attach
    from featopt.models.sae.formats import load_sae

    if not sae_path:
        raise FeatoptError("--sae is required: give an SAE folder (SAELens, sparsify or Gemma Scope).")
    if dtype not in DTYPES:
        raise FeatoptError(f"--dtype {dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    sae = load_sae(sae_path)
    if adapter is None:
        adapter = load_model(model, dtype=DTYPES[dtype], **options)
    else:
        adapter = adapter.with_bos(options.get("bos", adapter.bos))
    attach(adapter, sae, sae_path)  # validates the site and its width
    return adapter, sae


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """Latents named in feature notation (`"[:, :, 0-49]"`, `"[:, :, 3,17]"`) or a bare list
    (`"0-49"`, `"3,17"`): one latent per problem, each below `d_sae`."""
    spec = str(spec).strip()
    if not spec.startswith("["):
        spec = f"[:, :, {spec}]" if "," not in spec else f"[:, :, [{spec}]]"
    problems = parse_features(spec, n_tokens=1, width=d_sae, site="the SAE")
    latents = []
    for problem in problems:
        if problem.features is None or len(problem.features) != 1:
            raise FeatoptError(f"--features {spec!r} selects latents together ({problem.spec}): name single latents, "
                               "like [:, :, 0-49] or [:, :, [3, 17]].")
        latents.append(int(problem.features[0]))
    return list(dict.fromkeys(latents))


def _record(out: Path, name: str, document: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / name


def _run_meta(command: str, config, adapter: ModelAdapter, sae) -> dict:
    return {"command": command, "config": asdict(config), "model": adapter.name, "sae": sae.describe(),
            "dtype": str(adapter.dtype).replace("torch.", ""), "versions": versions()}


# ----------------------------------------------------------------------------- features
@dataclass
class FeaturesConfig:
    """Settings of `featopt sae features`: statistics of every latent over a corpus, one pass."""

    model: str = "tiny-llama"
    bos: bool = False  # start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    sae: str = ""
    corpus: str = ""
    split: str = "all"  # all, train or eval (the text `sae train` held out)
    eval_fraction: float = 0.05
    tokens: int = 1_000_000  # at most this many corpus tokens
    context_length: int = 128
    batch_contexts: int = 8
    top_k: int = 20  # top activating examples kept per latent
    n_bins: int = 10  # equal-width activation bins, one uniform example each
    window_before: int = 24  # context tokens kept before an example
    window_after: int = 8
    skip_first: int = 1  # leading positions left out (position 0: an attention sink)
    seed: int = 0
    dtype: str = "float32"
    out: str | None = None
    progress: bool = True


@dataclass
class FeaturesRun:
    stats: object  # featopt.dictionaries.corpus_stats.FeatureStats
    out: Path = field(default_factory=Path)


def _check_features(config: FeaturesConfig) -> None:
    _check_positive(config, ("tokens", "context_length", "batch_contexts", "top_k", "n_bins"))
    for name in ("window_before", "window_after"):
        if getattr(config, name) < 0:
            raise FeatoptError(f"--{name} must be 0 or more, got {getattr(config, name)}.")
    if not 0 <= config.skip_first < config.context_length:
        raise FeatoptError(f"--skip_first must be between 0 and {config.context_length - 1}, got {config.skip_first}.")
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")


def run_features(config: FeaturesConfig, adapter: ModelAdapter | None = None) -> FeaturesRun:
    """Stream up to `config.tokens` corpus tokens through the model and the SAE; keep, for every
    latent, its top examples, frequency, histogram and one uniform example per bin; write
    `features.safetensors` + `features.json` into `out`."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries.corpus_stats import corpus_stats

    _check_features(config)
    adapter, sae = load_model_and_sae(config.model, config.sae, config.dtype, adapter, **model_options(config))
    _check_context(adapter, config.context_length)
    contexts, sources = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                                        eval_fraction=config.eval_fraction, max_tokens=config.tokens, with_sources=True,
                                        bos=bos_id(adapter))
    out = _out(config.out)
    stats = corpus_stats(adapter, sae, contexts, sources=sources, batch_contexts=config.batch_contexts,
                         top_k=config.top_k, n_bins=config.n_bins, window=(config.window_before, config.window_after),
                         seed=config.seed, skip_first=config.skip_first, progress=config.progress)
    stats.meta.update(_run_meta("sae features", config, adapter, sae))
    stats.save(out)
    return FeaturesRun(stats, out)


def format_features(run: FeaturesRun) -> str:
    stats = run.stats
    alive = int((stats.freq > 0).sum())
    order = torch.argsort(stats.freq, descending=True)[:5].tolist()
    lines = [f"{stats.tokens:,} tokens; {alive} of {len(stats.freq)} latents fired at least once",
             "most frequent: " + ", ".join(f"{i} ({float(stats.freq[i]) / max(stats.tokens, 1):.2%})" for i in order)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- lens
@dataclass
class LensConfig:
    """Settings of `featopt sae lens`: decoder directions through the unembedding."""

    model: str = "tiny-llama"
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    sae: str = ""
    features: str = "[:, :, 0-9]"  # the latents
    k: int = 10  # top and bottom tokens
    norm: str = "weight"  # none (the raw LM head), weight (the final norm's gain), apply (the norm module)
    drop_z: float | None = 3.0  # drop tokens whose unembedding norm has z-score above this (None: keep)
    drop_top: int | None = None  # or drop the n largest-norm tokens
    dtype: str = "float32"
    out: str | None = None


@dataclass
class LensRun:
    records: list[dict]
    out: Path = field(default_factory=Path)


def run_lens(config: LensConfig, adapter: ModelAdapter | None = None) -> LensRun:
    from featopt.dictionaries.lens import logit_lens

    _check_positive(config, ("k",))
    if config.drop_top is not None and config.drop_top < 0:
        raise FeatoptError(f"--drop_top must be 0 or more, got {config.drop_top}.")
    if config.drop_z is not None and not config.drop_z == config.drop_z:
        raise FeatoptError("--drop_z must be a number (a z-score such as 3), not nan.")
    adapter, sae = load_model_and_sae(config.model, config.sae, config.dtype, adapter, **model_options(config))
    latents = parse_latents(config.features, sae.d_sae)
    lens = logit_lens(adapter, sae, latents, k=config.k, norm=config.norm, drop_z=config.drop_z, drop_top=config.drop_top)
    records = lens.records(adapter.decode)
    out = _out(config.out)
    _record(out, "lens.json", {"run": _run_meta("sae lens", config, adapter, sae), "latents": records})
    return LensRun(records, out)


def format_lens(run: LensRun) -> str:
    lines = []
    for r in run.records:
        top = " ".join(repr(t) for t, _ in r["top"])
        bottom = " ".join(repr(t) for t, _ in r["bottom"])
        lines.append(f"latent {r['latent']}: top {top} | bottom {bottom}")
    if run.records:
        lines.append(f"removed high-norm tokens: {' '.join(repr(t) for t in run.records[0]['removed']) or '(none)'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ablate
@dataclass
class AblateConfig:
    """Settings of `featopt sae ablate`: which earlier tokens a latent depends on (ablated text),
    and what removing its direction does to the next-token log-probs (direction ablation)."""

    model: str = "tiny-llama"
    bos: bool = False  # run the model's BOS token first, at position 0, never removed (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    sae: str = ""
    latent: int = 0
    text: str = ""
    position: int | None = None  # the target token, 0-based in the model input (default: where the latent is largest)
    mode: str = "contribution"  # contribution (x - z_i W_dec[i]) or projection (remove the direction)
    top: int = 10  # tokens whose log-prob changed most
    dtype: str = "float32"
    out: str | None = None


@dataclass
class AblateRun:
    record: dict
    out: Path = field(default_factory=Path)


MODES = ("contribution", "projection")


def run_ablate(config: AblateConfig, adapter: ModelAdapter | None = None) -> AblateRun:
    from featopt.dictionaries.ablation import ablated_text, direction_ablation
    from featopt.models.sae.attach import site_of

    _check_positive(config, ("top",))
    if config.mode not in MODES:
        raise FeatoptError(f"--mode {config.mode!r} is not known: allowed are {', '.join(MODES)}.")
    adapter, sae = load_model_and_sae(config.model, config.sae, config.dtype, adapter, **model_options(config))
    if not 0 <= config.latent < sae.d_sae:
        raise FeatoptError(f"--latent {config.latent} is out of range: this SAE has {sae.d_sae} latents (0-{sae.d_sae - 1}).")
    if not config.text.strip():
        raise FeatoptError("--text is empty: give a text of at least two tokens.")
    ids = adapter.encode(config.text)  # [BOS, text...] with --bos: positions count the model input
    kept = int(adapter.bos)  # the BOS token at position 0 is never removed
    if len(ids) - kept < 2:
        raise FeatoptError(f"--text {config.text!r} is {len(ids) - kept} token: give at least two tokens.")
    adapter.check_positions(len(ids), f"--text of {len(ids) - kept} tokens", "shorten it")
    site = adapter.site(site_of(sae))
    with torch.inference_mode():
        z = sae.encode(adapter.run([site], input_ids=ids[None])[site])[0, :, config.latent].float()
    first = kept + 1  # the first token with an earlier (removable) token
    position = int(z[first:].argmax()) + first if config.position is None else config.position
    if not first <= position < len(ids):
        after = " after the BOS token at position 0" if kept else ""
        raise FeatoptError(f"--position {position} is out of range: the text has {len(ids) - kept} tokens{after}, so "
                           f"give {first} to {len(ids) - 1} (a token with earlier tokens to remove).")
    decode = adapter.decode  # ids -> text
    ablated = ablated_text(adapter, sae, config.latent, ids, position, first=kept)
    direction = direction_ablation(adapter, sae, config.latent, ids[None], mode=config.mode, top=config.top)
    record = {"latent": config.latent, "position": position, "activations": z.tolist(),
              "ablated_text": ablated.record(decode), "direction_ablation": direction.record(decode)}
    out = _out(config.out)
    _record(out, "ablate.json", {"run": _run_meta("sae ablate", config, adapter, sae), **record})
    return AblateRun(record, out)


def format_ablate(run: AblateRun) -> str:
    text = run.record["ablated_text"]
    first = text.get("first", 0)  # 1 with --bos: the BOS token at position 0 is kept
    kept = " (the BOS token at position 0 kept)" if first else ""
    lines = [f"latent {run.record['latent']} at position {text['target']} ({text['tokens'][text['target']]!r}): "
             f"{text['base']:.4g}; removing each earlier token{kept} changes it by"]
    if max(run.record["activations"][first:]) <= 0:
        lines[0] = f"latent {run.record['latent']} is 0 at every position of this text; nothing to ablate."
        return lines[0]
    for token, change, rel in zip(text["tokens"][first:], text["change"], text["relative"]):
        lines.append(f"  {token!r:<20} {change:+.4g}" + (f"  ({rel:+.1%})" if rel is not None else ""))
    direction = run.record["direction_ablation"]
    lines.append(f"direction ablation ({direction['mode']}), next-token log-prob changes: "
                 + " ".join(f"{d:+.2f}" for d in direction["delta"][0]))
    lines.append("most decreased: " + ", ".join(f"{t!r} {v:+.3g}" for t, v in direction["decreased"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- mcs
@dataclass
class MCSConfig:
    """Settings of `featopt sae mcs`: each latent's max cosine similarity with another dictionary."""

    sae: str = ""  # two or more SAE folders at the same site, comma-separated (e.g. 1x,2x,4x,8x)
    threshold: float = 0.9  # count latents whose MCS is at least this
    bins: int = 20
    out: str | None = None


@dataclass
class MCSRun:
    rows: list[dict]
    out: Path = field(default_factory=Path)


def run_mcs(config: MCSConfig) -> MCSRun:
    from featopt.models.sae.formats import load_sae
    from featopt.dictionaries.mcs import mcs_table

    _check_positive(config, ("bins",))
    if not 0.0 <= config.threshold <= 1.0:
        raise FeatoptError(f"--threshold must be a cosine between 0 and 1, got {config.threshold}.")
    paths = [p.strip() for p in str(config.sae).split(",") if p.strip()]
    if len(paths) < 2:
        raise FeatoptError("--sae needs at least two SAE folders, comma-separated, to compare.")
    saes = [load_sae(p) for p in paths]
    names = [Path(p).name or p for p in paths]
    rows = mcs_table(saes, names, threshold=config.threshold, bins=config.bins)
    out = _out(config.out)
    document = {"run": {"command": "sae mcs", "config": asdict(config), "versions": versions(),
                        "saes": [{"path": p, **s.describe()} for p, s in zip(paths, saes)]}, "rows": rows}
    _record(out, "mcs.json", document)
    _mcs_png(out / "mcs.png", rows, names, config.threshold)
    return MCSRun(rows, out)


def _mcs_png(path: Path, rows: list[dict], names: list[str], threshold: float) -> None:
    """One histogram line per compared pair, drawn next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        counts = row["histogram"]
        edges = [i / len(counts) for i in range(len(counts) + 1)]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        total = max(sum(counts), 1)
        ax.plot(centers, [c / total for c in counts], marker=".", label=f"{row['a']} in {row['b']}")
    ax.axvline(threshold, color="grey", linestyle=":")
    ax.set_xlabel("max cosine similarity with the other dictionary")
    ax.set_ylabel("fraction of latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def format_mcs(run: MCSRun) -> str:
    from featopt.dictionaries.mcs import format_mcs as table

    return table(run.rows)
