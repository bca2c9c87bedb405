"""Turn a model name into ``(model, tokenizer)``: built-in tiny models, local folders, GGUF files,
names under ``FEATOPT_MODEL_PATH``, or hub ids.

Resolution order of ``load_model(name)``:

1. a built-in tiny name (:data:`featopt.models.tiny.TINY_MODELS`);
2. an existing local path: a folder with ``config.json``, a ``.gguf`` file, or a folder holding
   exactly one ``.gguf``;
3. a subfolder of a folder in ``FEATOPT_MODEL_PATH`` (``os.pathsep``-separated) named ``name``
   or ``name-<anything>``, case-insensitive, that holds a model (so ``smollm2-135m-instruct``
   finds ``smollm2-135m-instruct-q4_1-gguf/``);
4. a Hugging Face hub id.

GGUF files are de-quantized once (~30 s) and cached as a plain HF folder (fp32 safetensors,
config, tokenizer) in ``$FEATOPT_CACHE/gguf/<stem>-<fingerprint>/`` (default cache
``~/.cache/featopt``); later loads read that folder (~1 s).

The model maps input ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``; it comes back in
eval mode with ``requires_grad`` off on every parameter: featopt optimizes inputs, never weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from featopt import cache
from featopt.cache import cache_dir
from featopt.errors import FeatoptError
from featopt.models.tiny import TINY_MODELS, build_tiny

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedModel:
    """A model ready for feature work, and where it came from."""

    model: PreTrainedModel  # eval(), requires_grad False on all params
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    source: str  # 'built-in', a folder path, a gguf path, or a hub id
    untrained: bool
    seed: int | None  # the re-init seed when untrained
    trust_remote_code: bool = False  # whether the model's own Python code was allowed to run


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.gguf"))


def _model_path_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get("FEATOPT_MODEL_PATH", "").split(os.pathsep) if p]


def available_models() -> list[str]:
    """Names of the model folders under ``FEATOPT_MODEL_PATH``, for error messages."""
    return sorted(d.name for root in _model_path_dirs() if root.is_dir()
                  for d in root.iterdir() if d.is_dir() and _holds_model(d))


def _search_model_path(name: str) -> Path | None:
    """The folder under FEATOPT_MODEL_PATH for ``name``: the first listed root with a match wins,
    an exact name beats a ``name-...`` prefix, and two prefix matches in one root are ambiguous."""
    key, not_models = name.lower(), []
    for root in _model_path_dirs():
        if not root.is_dir():
            continue
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        exact = [d for d in subdirs if d.name.lower() == key]
        prefix = [d for d in subdirs if d.name.lower().startswith(key + "-") and _holds_model(d)]
        if exact and _holds_model(exact[0]):
            return exact[0]
        not_models += exact
        if len(prefix) == 1:
            return prefix[0]
        if prefix:
            raise FeatoptError(f"Model name {name!r} is ambiguous under {root}: it matches "
                               f"{', '.join(d.name for d in prefix)}; give the full folder name.")
    if not_models:  # a folder named exactly so, but no model in it: say so, do not try the hub
        return not_models[0]
    return None


def _fingerprint(gguf: Path) -> str:
    """Cache key of a GGUF file: sha256 of its resolved path, size, mtime and the transformers version.

    Hashing the bytes would cost ~0.13 s per 100 MB on every load (many seconds for a multi-GB
    file), while ``stat`` is free. A file replaced or edited in place gets a new size/mtime, so a new
    entry; a copy at another path is converted again (slow once, never wrong). The transformers
    version is in the key because the de-quantization and tokenizer conversion live there.
    """
    st = gguf.stat()
    key = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_cache_folder(gguf: Path) -> Path:
    """Where the converted copy of ``gguf`` lives (or will live)."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{_fingerprint(gguf)}"


def _convert_gguf(gguf: Path) -> Path:
    """De-quantize ``gguf`` to an fp32 HF folder in the cache, once; return that folder. It is a
    cache entry (:func:`featopt.cache.entry`): saved into a temporary sibling and renamed into place,
    checked on every load, converted again when incomplete or corrupt."""

    def convert(tmp: Path) -> None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise FeatoptError(f"Loading {gguf} needs the {' and '.join(missing)} package(s): "
                               f'pip install "featopt[gguf]".')
        kw = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        try:  # dequantize=True: dense fp32 weights, so save_pretrained accepts the model
            kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
        except AttributeError:  # a transformers without GgufConfig: its default GGUF load
            pass  # de-quantizes; if that model still refuses to save, the error says why
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return cache.entry(gguf_cache_folder(gguf), convert)


def _read_gguf(gguf: Path) -> Path:
    """`_convert_gguf`, with a file that is not a whole GGUF (cut short, another format) as one sentence."""
    try:
        return _convert_gguf(gguf)
    except FeatoptError:
        raise
    except Exception as e:  # the GGUF readers raise struct.error, ValueError, KeyError... on a broken file
        raise FeatoptError(f"Model file {str(gguf)!r} is not a readable .gguf (truncated or not GGUF: "
                           f"{type(e).__name__}): give a complete .gguf file.") from e


def _check_config_json(config: Path) -> None:
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FeatoptError(f"Model folder {str(config.parent)!r} has a config.json that is not JSON: give a model "
                           "folder saved by transformers (save_pretrained).") from e


def _local(name: str, path: Path) -> tuple[Path, str]:
    """An existing local path -> (HF folder to load from, source)."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FeatoptError(f"Model {name!r} is a file but not a .gguf; give a model folder "
                               f"(with config.json) or a .gguf file.")
        return _read_gguf(path), str(path.resolve())
    if (path / "config.json").is_file():
        _check_config_json(path / "config.json")
        return path, str(path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _read_gguf(ggufs[0]), str(ggufs[0].resolve())
    if ggufs:
        raise FeatoptError(f"Folder {path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                           f"give the path of the one to load.")
    what = "only a tokenizer" if any((path / f).is_file() for f in _TOKENIZER_FILES) else "no model"
    raise FeatoptError(f"Folder {path} holds {what}, so {name!r} cannot be loaded as a model: a model "
                       f"folder needs a config.json and weights, or a single .gguf file.")


def _reinit(config, seed: int, trust_remote_code: bool = False) -> PreTrainedModel:
    """A fresh random model of ``config``'s architecture, drawn under ``torch.manual_seed(seed)``."""
    attn = getattr(config, "_attn_implementation", None)
    kw = {"attn_implementation": attn} if attn else {}
    kw["trust_remote_code"] = trust_remote_code
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kw)


def _remote_code_error(name: str, source: str) -> FeatoptError:
    return FeatoptError(f"Model {name!r} ({source}) needs to run its own Python code to load, which featopt "
                        f"never does unless asked: pass --trust_remote_code if you trust its source.")


def _needs_remote_code(error: Exception) -> bool:
    """transformers' refusal to run a model's own code (its message names the argument)."""
    return "trust_remote_code" in str(error)


def _hub_error(name: str, offline: bool) -> FeatoptError:
    avail = ", ".join(available_models()) or "none found"
    why = "HF_HUB_OFFLINE is set" if offline else "no such repo, or no network"
    return FeatoptError(
        f"Cannot load model {name!r}: use a built-in name ({', '.join(TINY_MODELS)}), a local model "
        f"folder or .gguf file, a name found under FEATOPT_MODEL_PATH ({avail}), or a Hugging Face "
        f"hub id with network access (the hub lookup failed: {why}).")


def load_model(name: str, *, untrained: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Resolve ``name`` (see the module docstring) and load it in eval mode, gradients off.

    ``untrained=True`` gives the same architecture and tokenizer with weights re-drawn from
    the config's own initializer under ``torch.manual_seed(seed)``: a baseline for "is this
    feature learned, or does a random network show it too?". A model whose config names its
    own Python code fails with one sentence unless ``trust_remote_code`` (``--trust_remote_code``):
    loading a folder or hub id must never run code from it by default.
    """
    if name in TINY_MODELS:
        model, tok = build_tiny(name)
        source = "built-in"
        if untrained:
            model = _reinit(model.config, seed)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return LoadedModel(model, tok, name, source, untrained, seed if untrained else None)
    path = Path(name).expanduser()
    found = path if path.exists() else _search_model_path(name)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it here so that setting it
    # later (tests, notebooks) still means "no network call, fail fast".
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    kw = {"local_files_only": True} if offline and found is None else {}
    folder, source = _local(name, found) if found is not None else (name, name)
    kw["trust_remote_code"] = trust_remote_code
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        if _needs_remote_code(e):
            raise _remote_code_error(name, source) from e
        if found is None:
            raise _hub_error(name, offline) from e
        raise FeatoptError(f"Model folder {folder} has no usable tokenizer ({type(e).__name__}).") from e
    try:
        if untrained:
            model = _reinit(AutoConfig.from_pretrained(folder, **kw), seed, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a weights file cut short
        if _needs_remote_code(e):
            raise _remote_code_error(name, source) from e
        first_line = (str(e).splitlines() or [""])[0]
        raise FeatoptError(f"Cannot load model {name!r} from {source} ({type(e).__name__}: {first_line}).") from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model, tok, name, source, untrained, seed if untrained else None, trust_remote_code)
