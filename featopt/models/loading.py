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

A model larger than one device loads with a ``device_map`` (accelerate's strategies ``auto``,
``balanced``, ``balanced_low_0``, ``sequential``, or a dict of module names to devices, ``"disk"``
included) and ``max_memory``; before any weight is read, :func:`featopt.memory.check_model` compares
what the model will need with what is free and refuses, in one sentence, a load that cannot fit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from featopt import cache, memory
from featopt.cache import cache_dir
from featopt.errors import FeatoptError
from featopt.models.placement import is_dispatched, parse_device_map, parse_max_memory
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
    device_map: dict | None = None  # module name -> device, when accelerate dispatched the model


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


def _cast(model: PreTrainedModel, dtype: torch.dtype, device: str | torch.device | None = None) -> PreTrainedModel:
    """`model` on `device` with its floating parameters in `dtype`; floating buffers (rotary
    frequencies) only ever widened, never narrowed: a bfloat16 model keeps float32 rotary
    frequencies, as transformers' own `from_pretrained(dtype=bfloat16)` does, instead of positions
    rounded to 8 bits of mantissa."""
    if device is not None:
        model = model.to(device)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.element_size() < dtype.itemsize:
                setattr(module, name, buffer.to(dtype))
    return model


def _offload_folder() -> str:
    """A fresh folder for weights accelerate offloads to the disk, removed when the process ends (in
    the featopt cache, not the temporary folder: that is often in memory, and the weights are large)."""
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _dispatch(model: PreTrainedModel, device_map: str | dict, max_memory: dict | None, dtype: torch.dtype) -> PreTrainedModel:
    """An in-memory model (built-in, re-initialized) placed by `device_map` as from_pretrained would."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    model = _cast(model, dtype)
    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map == "sequential":
            limits = get_max_memory(max_memory)
        else:
            limits = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    if device_map.get("") == "disk":  # accelerate offloads nothing for the root's own name: name its children
        device_map = {**{child: "disk" for child, _ in model.named_children()}, **{k: v for k, v in device_map.items() if k}}
    places = set(device_map.values())
    if len(places) == 1 and "disk" not in places:  # one device: a plain move, no hooks
        place = next(iter(places))
        return model.to(f"cuda:{place}" if isinstance(place, int) else place)
    try:
        model = dispatch_model(model, device_map=device_map, offload_dir=_offload_folder())
    except (ValueError, KeyError) as e:  # a module the map does not place, or a name the model lacks
        raise _device_map_error(e) from e
    model.hf_device_map = device_map
    return model


def _device_map_error(e: Exception) -> FeatoptError:
    first_line = (str(e).splitlines() or [""])[0]
    return FeatoptError(f"--device_map does not fit this model ({first_line}): name every module once, by its "
                        f"name in the model (e.g. model.layers.0, lm_head), or use auto.")


def load_model(name: str, *, untrained: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               device_map: str | dict | None = None, max_memory: str | dict | None = None) -> LoadedModel:
    """Resolve ``name`` (see the module docstring) and load it in eval mode, gradients off.

    ``untrained=True`` gives the same architecture and tokenizer with weights re-drawn from
    the config's own initializer under ``torch.manual_seed(seed)``: a baseline for "is this
    feature learned, or does a random network show it too?". A model whose config names its
    own Python code fails with one sentence unless ``trust_remote_code`` (``--trust_remote_code``):
    loading a folder or hub id must never run code from it by default.

    ``device_map`` (``--device_map``: a strategy, a dict, or a JSON file or object of one) and
    ``max_memory`` (``--max_memory``: ``{"0": "20GiB", "cpu": "60GiB"}``, as a dict or JSON) spread
    the model over devices and the disk with accelerate; ``device`` is then unused. Untrained models
    and the built-in ones are built in memory first, then placed.
    """
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if max_memory and not device_map:
        raise FeatoptError("--max_memory only applies with --device_map: add --device_map auto (or balanced, "
                           "sequential, a JSON file), or drop --max_memory.")
    fits = dict(device=device, device_map=device_map, max_memory=max_memory)
    if name in TINY_MODELS:
        model, tok = build_tiny(name)
        memory.check_model(name, model.config, dtype, **fits)
        if untrained:
            model = _reinit(model.config, seed)
        model = _dispatch(model, device_map, max_memory, dtype) if device_map else _cast(model, dtype, device)
        return _loaded(model, tok, name, "built-in", untrained, seed, False)
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
        config = AutoConfig.from_pretrained(folder, **kw)
        memory.check_model(name, config, dtype, trust_remote_code=trust_remote_code, **fits)
        if untrained:
            model = _reinit(config, seed, trust_remote_code)
            model = _dispatch(model, device_map, max_memory, dtype) if device_map else model
        elif device_map:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                                         offload_folder=_offload_folder(), **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a weights file cut short
        if _needs_remote_code(e):
            raise _remote_code_error(name, source) from e
        if device_map and not untrained and isinstance(e, ValueError):
            raise _device_map_error(e) from e
        first_line = (str(e).splitlines() or [""])[0]
        raise FeatoptError(f"Cannot load model {name!r} from {source} ({type(e).__name__}: {first_line}).") from e
    if not device_map:
        model = _cast(model, dtype, device)
    return _loaded(model, tok, name, source, untrained, seed, trust_remote_code)


def _loaded(model, tok, name: str, source: str, untrained: bool, seed: int, trust_remote_code: bool) -> LoadedModel:
    model = model.eval().requires_grad_(False)
    placed = dict(model.hf_device_map) if is_dispatched(model) and hasattr(model, "hf_device_map") else None
    return LoadedModel(model, tok, name, source, untrained, seed if untrained else None, trust_remote_code, placed)
