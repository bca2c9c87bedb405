"""SAEs on disk: featopt writes SAELens' format and reads SAELens, sparsify and Gemma Scope files.

- **SAELens** (what :func:`save_sae` writes): a folder with `cfg.json` and `sae_weights.safetensors`
  holding `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` and what the
  architecture adds (its class' `saved_names`: jumprelu's `threshold [d_sae]`). The cfg follows
  sae-lens 6: `architecture` (the class' `saelens_name`: "standard" is featopt's relu), `d_in`,
  `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`,
  `reshape_activations`, the architecture's own fields (`k` for topk), and `metadata` holding
  `hook_name` (TransformerLens' spelling, which sae-lens hooks by), `model_name` and
  `sae_lens_version`. featopt's own settings (its architecture name, its hook spelling, its
  metadata) go in `metadata.featopt`, which sae-lens keeps as an unknown metadata attribute.
- **sparsify** (EleutherAI): one folder per hookpoint (`layers.6`) with `cfg.json` (`d_in`, `k`,
  `num_latents` or `expansion_factor`) and `sae.safetensors` (`encoder.weight [d_sae, d_in]`,
  `encoder.bias [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`). Its encoder reads `x - b_dec`,
  takes relu and keeps the top k: featopt's topk exactly. The hook name is the folder's name.
- **Gemma Scope**: `params.npz` (the file or its folder) with `W_enc`, `b_enc`, `W_dec`, `b_dec`,
  `threshold`; jumprelu, and its encoder does *not* subtract `b_dec`. The file names no hook: give
  `hook_name`, or keep Gemma Scope's layout (`...gemma-scope-2b-pt-res/layer_20/...`), from which the
  hook is read as sae-lens does (`-res` -> resid_post, `-mlp` -> mlp_out).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NoReturn

import torch

from featopt.atomic import atomic_folder
from featopt.errors import FeatoptError
from featopt.models.sae import storage
from featopt.models.sae.model import ARCHITECTURES, SAEConfig, SparseAutoencoder
from featopt.models.sae.saelens_names import read_architecture, saelens_architecture
from featopt.models.sites import parse_site

CFG, WEIGHTS, SPARSIFY_WEIGHTS, GEMMA_SCOPE = "cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz"
FORMAT = "featopt-sae/1"  # metadata.featopt.format: marks a folder save_sae may replace
# sae-lens reads a cfg by its 6.x rules only when metadata.sae_lens_version >= 6 (handle_config_defaulting);
# this is the layout's version, not a claim about which sae-lens wrote the file.
SAELENS_LAYOUT_VERSION = "6.0.0"
_TL_KINDS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
             "mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out", "mlp_hidden": "mlp.hook_post"}
_KNOWN = ("a SAELens folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint folder (cfg.json + sae.safetensors)"
          " or a Gemma Scope params.npz")


def _fail(message: str) -> NoReturn:
    raise FeatoptError(message)


def _by_saelens_name() -> dict[str, type[SparseAutoencoder]]:
    """Every architecture by the names SAELens' cfg.json gives it (its own, then its aliases)."""
    names = {}
    for cls in ARCHITECTURES.values():
        for name in (cls.saelens_name, *cls.saelens_aliases):
            names.setdefault(name, cls)
    return names


# ----------------------------------------------------------------------------------------- saving
def save_sae(sae: SparseAutoencoder, out_dir: str | Path) -> Path:
    """Write `sae` to `out_dir` in SAELens' format, atomically; returns the folder.

    Tensors are written in the SAE's own dtype (recorded as `dtype`, which sae-lens casts to). Any
    input scaling must already be folded into the weights (`fold_scale`), so `normalize_activations`
    is "none". `out_dir` may be new, empty, or an SAE folder earlier written here; anything else
    raises FeatoptError, so no user file is ever replaced.
    """
    out, cfg = Path(out_dir), sae.cfg
    if out.exists() and not _replaceable(out):
        _fail(f"{out} exists and is not an SAE folder written by featopt: give a new or empty folder.")
    # sae-lens hooks a HookedTransformer by TransformerLens' name: featopt's spelling is kept for featopt
    hook, hook_out = _tl_hook(cfg.hook_name), _tl_hook(cfg.target_hook_name)
    arch, fields, arch_meta = saelens_architecture(sae)
    outs = {"hook_name_out": hook_out} if sae.is_transcoder else {}
    doc = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none", "reshape_activations": "none",
        **fields,
        # Top-level names too, for readers of sae-lens < 6 and people; sae-lens 6 ignores them.
        "hook_name": hook, **outs, "model_name": cfg.model_name,
        "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, "hook_name": hook, **outs, "model_name": cfg.model_name,
                     **arch_meta,
                     "featopt": {"format": FORMAT, "architecture": cfg.architecture, "hook_name": cfg.hook_name,
                                 **({"target_hook_name": cfg.target_hook_name} if sae.is_transcoder else {}),
                                 "metadata": cfg.metadata}},
    }
    text = json.dumps(doc, indent=2, default=str)
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in sae.tensor_names}
    from safetensors.torch import save_file

    with atomic_folder(out) as tmp:
        (tmp / CFG).write_text(text, encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS))
        os.chmod(tmp / WEIGHTS, (tmp / CFG).stat().st_mode)  # safetensors writes 0600; give it the umask's mode
    return out


def _tl_hook(name: str) -> str:
    """TransformerLens' spelling of a featopt site name (others unchanged)."""
    match = re.match(r"^blocks\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_in|mlp_out|mlp_hidden)$", name)
    return f"blocks.{match[1]}.{_TL_KINDS[match[2]]}" if match else name


def _replaceable(out: Path) -> bool:
    """An empty folder, or one holding only a cfg.json marked as featopt's and its weights."""
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    if not names:
        return True
    try:
        doc = json.loads((out / CFG).read_text(encoding="utf-8"))
        marked = doc["metadata"]["featopt"]["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return marked and names <= {CFG, WEIGHTS}


# ----------------------------------------------------------------------------------------- loading
def load_sae(path: str | Path, *, hook_name: str | None = None, dtype: torch.dtype = torch.float32,
             mmap: bool = True) -> SparseAutoencoder:
    """Read an SAE in any of the three formats (detected from the files), weights cast to `dtype`.

    `hook_name`, when given, replaces the name the files give. `cfg.dtype` records the file's dtype.
    `mmap` (see `storage`): the parameters are the file's bytes, mapped privately and read when
    first used, with no copy where `dtype` is the file's (a Gemma Scope npz is converted once into
    featopt's cache and mapped from there); False reads the weights whole (and no cache is written).
    """
    path = Path(path)
    if path.is_file() and path.name == GEMMA_SCOPE:
        return _load_gemma_scope(path, hook_name, dtype, mmap)
    if not path.is_dir():
        _fail(f"SAE path {path} {'is not a folder' if path.exists() else 'does not exist'}: give {_KNOWN}.")
    if (path / GEMMA_SCOPE).is_file():
        return _load_gemma_scope(path / GEMMA_SCOPE, hook_name, dtype, mmap)
    if (path / CFG).is_file() and (path / WEIGHTS).is_file():
        return _load_saelens(path, hook_name, dtype, mmap)
    if (path / CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return _load_sparsify(path, hook_name, dtype, mmap)
    hookpoints = sorted(p.name for p in path.iterdir() if (p / SPARSIFY_WEIGHTS).is_file())
    if hookpoints:  # a sparsify checkpoint: one SAE per hookpoint folder
        _fail(f"{path} holds one sparsify SAE per hookpoint ({', '.join(hookpoints)}): give one of those folders.")
    _fail(f"{path} holds no SAE files: give {_KNOWN}.")


def _read_cfg(path: Path) -> dict:
    try:
        doc = json.loads((path / CFG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _fail(f"{path / CFG} is not readable JSON ({type(e).__name__}): it must be the SAE's JSON config.")
    if not isinstance(doc, dict):
        _fail(f"{path / CFG} holds a JSON {type(doc).__name__}, not an object: it must be the SAE's JSON config.")
    return doc


def _absolute(path: Path) -> Path:
    """The absolute path with `.` and `..` removed but links kept (their names carry the hook)."""
    return Path(os.path.abspath(path))


def _int(doc: dict, key: str, where: Path) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{where / CFG} needs an integer {key!r}, got {value!r}.")
    return value


def _load_saelens(path: Path, hook_name: str | None, dtype: torch.dtype, mmap: bool) -> SparseAutoencoder:
    doc = _read_cfg(path)
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    ours = meta.get("featopt") if isinstance(meta.get("featopt"), dict) else {}
    known = _by_saelens_name()
    arch = doc.get("architecture", "standard")
    activation = doc.get("activation_fn_str", doc.get("activation_fn"))
    if arch == "standard" and activation in known and known[activation] is not known.get(arch):
        # sae-lens < 6 called every SAE "standard" and named topk by its activation function
        doc = {**doc, **(doc.get("activation_fn_kwargs") or {})}
        arch = activation
    cls, arch_fields = read_architecture(arch, meta, known)
    if cls is None:
        readable = [cls.saelens_name + (f" ({name})" if cls.saelens_name != name else "") for name, cls in ARCHITECTURES.items()]
        _fail(f"{path / CFG} has architecture {arch!r}: featopt reads "
              f"{', '.join(dict.fromkeys(readable))} SAEs and the transcoders of those.")
    if doc.get("normalize_activations") not in (None, "none", False):
        _fail(f"{path / CFG} has normalize_activations {doc['normalize_activations']!r}: featopt reads only 'none' "
              "(fold the scaling into the weights first, e.g. sae-lens' fold_activation_norm_scaling_factor).")
    tensors, release = storage.read_safetensors(path / WEIGHTS, mmap=mmap)
    if doc.get("rescale_acts_by_decoder_norm"):
        # sae-lens saves its topk SAEs with the decoder norms folded in (unit rows) but keeps the
        # flag; with unit rows the rescaling is the identity, so only other rows are refused.
        # By blocks of rows: a float copy of a wide decoder would double it.
        rows = tensors.get("W_dec", torch.ones(1, 1))
        norms = (torch.cat([part.float().norm(dim=-1) for part in rows.split(1 << 14)]) if rows.ndim == 2
                 else rows.float().norm(dim=-1))
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            _fail(f"{path / CFG} sets rescale_acts_by_decoder_norm with decoder rows not of unit norm: "
                  "featopt reads topk SAEs without it (fold the norms into the weights first).")
    if ours.get("format") == FORMAT and ours.get("architecture") in ARCHITECTURES:
        cls = ARCHITECTURES[ours["architecture"]]  # what featopt trained, where several share a sae-lens name
    tensors = cls.tensors_from_saelens(tensors)
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        _fail(f"{path / WEIGHTS} has a scaling_factor other than 1: featopt reads SAEs with it folded into the weights.")
    if ours.get("format") != FORMAT:
        ours = {"metadata": {"source_format": "sae_lens"}}
    coder = {}
    if "skip" in arch_fields or doc.get("hook_name_out") or meta.get("hook_name_out"):  # a transcoder
        coder = dict(d_out=_int(doc, "d_out", path), skip=arch_fields.pop("skip", False),
                     target_hook_name=ours.get("target_hook_name") or meta.get("hook_name_out") or doc.get("hook_name_out") or "")
        if not coder["target_hook_name"]:
            _fail(f"{path / CFG} is a transcoder that names no output hook: its metadata needs hook_name_out "
                  "(e.g. blocks.6.hook_mlp_out).")
    cfg = dict(d_in=_int(doc, "d_in", path), d_sae=_int(doc, "d_sae", path), architecture=cls.name,
               **cls.config_from_saelens(doc, path / CFG), **arch_fields, **coder,
               hook_name=hook_name or ours.get("hook_name") or meta.get("hook_name") or doc.get("hook_name")
               or doc.get("hook_point") or "",  # hook_point: sae-lens < 6
               model_name=meta.get("model_name") or doc.get("model_name") or "",
               apply_b_dec_to_input=bool(doc.get("apply_b_dec_to_input", True)),
                          metadata=ours.get("metadata", {}))
    return _build(path / WEIGHTS, cfg, tensors, dtype, release)


def _load_sparsify(path: Path, hook_name: str | None, dtype: torch.dtype, mmap: bool) -> SparseAutoencoder:
    doc = _read_cfg(path)
    if doc.get("activation", "topk") != "topk":
        _fail(f"{path / CFG} has activation {doc['activation']!r}: featopt reads only topk sparsify SAEs.")
    d_in = _int(doc, "d_in", path)
    # sparsify's rule: num_latents 0 means d_in * expansion_factor
    d_sae = _int(doc, "num_latents", path) if doc.get("num_latents") else d_in * _int(doc, "expansion_factor", path)
    raw, release = storage.read_safetensors(path / SPARSIFY_WEIGHTS, mmap=mmap)
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", *(["W_skip"] if doc.get("skip_connection") else [])} - set(raw)
    if missing:
        _fail(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(sorted(missing))}: "
              "a sparsify SAE holds encoder.weight, encoder.bias, W_dec and b_dec.")
    # nn.Linear stores the encoder as [d_sae, d_in]; W_dec is already [d_sae, d_in] (sparsify decodes with W_dec rows).
    # W_enc is the transposed view (no copy): matmuls read either layout.
    tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    coder = {}
    if doc.get("transcode") or doc.get("skip_connection"):
        # sparsify's transcoders read a module's input (for `layers.L.mlp`: the MLP's, after its norm)
        # and write its output, without centring the input; W_skip [d_out, d_in] as featopt's.
        site = site_of(hook_name or _absolute(path).name)
        inputs = {"mlp_out": "mlp_in", "resid_post": "resid_pre"}
        if doc.get("transcode") and site.split(".")[-1] not in inputs:
            _fail(f"{path} is a sparsify transcoder of {site}: featopt reads those of MLPs and blocks.")
        layer, kind = site.rsplit(".", 1)
        coder = dict(apply_b_dec_to_input=not doc.get("transcode"), skip=bool(doc.get("skip_connection")),
                     target_hook_name=site if doc.get("transcode") else "", d_out=raw["b_dec"].shape[0])
        if doc.get("transcode"):
            hook_name = f"{layer}.{inputs[kind]}"
        if coder["skip"]:
            tensors["W_skip"] = raw["W_skip"]
    model = ""
    try:  # the checkpoint root's config.json (sparsify's TrainConfig) names the model
        model = json.loads((path.parent / "config.json").read_text(encoding="utf-8")).get("model", "")
    except (OSError, ValueError, AttributeError):
        pass
    cfg = dict(d_in=d_in, d_sae=d_sae, architecture="topk", k=_int(doc, "k", path),
               hook_name=hook_name or _absolute(path).name, model_name=model, apply_b_dec_to_input=True,
               metadata={"source_format": "sparsify"})
    cfg.update(coder)
    return _build(path / SPARSIFY_WEIGHTS, cfg, tensors, dtype, release)


def _load_gemma_scope(file: Path, hook_name: str | None, dtype: torch.dtype, mmap: bool) -> SparseAutoencoder:
    # The members' headers give names and shapes: everything is checked before an array is read.
    arrays = storage.npz_arrays(file)
    # Gemma Scope spells the matrices W_enc/W_dec; some copies have w_enc/w_dec.
    names = {("W_" + k[2:] if k.startswith("w_") else k): k for k in arrays}
    if "W_enc" not in names or len(arrays[names["W_enc"]][0]) != 2:
        _fail(f"{file} holds no 2-D W_enc: a Gemma Scope params.npz holds W_enc, b_enc, W_dec, b_dec and threshold.")
    if hook_name is None:
        where = _absolute(file).as_posix()  # not resolve(): the Hugging Face cache links params.npz to a blob
        layer, kind = re.search(r"/layer_(\d+)/", where), re.search(r"gemma-scope-[^/]*-(res|mlp)(?:/|$)", where)
        if not (layer and kind):
            _fail(f"{file} names no hook: pass hook_name (e.g. blocks.20.hook_resid_post) "
                  "or keep Gemma Scope's folder layout.")
        hook_name = f"blocks.{layer.group(1)}.hook_{'resid_post' if kind.group(1) == 'res' else 'mlp_out'}"
    d_in, d_sae = arrays[names["W_enc"]][0]
    cfg = dict(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=hook_name,
               apply_b_dec_to_input=False, metadata={"source_format": "gemma_scope"})
    planned = {name: torch.empty(arrays[k][0], dtype=arrays[k][1], device="meta") for name, k in names.items()}

    def read() -> tuple[dict[str, torch.Tensor], storage.Release]:
        tensors, release = storage.read_npz(file, mmap=mmap)
        return {name: tensors[k] for name, k in names.items()}, release
    return _build(file, cfg, planned, dtype, read=read)


def _build(file: Path, cfg: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
           release: storage.Release | None = None, read=None) -> SparseAutoencoder:
    """Check names and shapes against `cfg`, then make a new SAE whose parameters are `tensors`
    (as they are where already in `dtype`, else converted one at a time, `release`d as they go).

    The SAE is built on the meta device (no memory) and the tensors are assigned, not copied, so a
    mapped file stays the only copy. `read()`, when given, returns the real `(tensors, release)`
    once the checks passed: `tensors` are then meta tensors of the planned shapes and dtypes.
    """
    config = SAEConfig(**cfg, dtype=str(tensors["W_enc"].dtype).removeprefix("torch.") if "W_enc" in tensors else "float32")
    with torch.device("meta"):
        sae = SparseAutoencoder(config)
    expected = {name: tuple(getattr(sae, name).shape) for name in sae.tensor_names}
    if set(tensors) != set(expected):
        _fail(f"{file} holds tensors {', '.join(sorted(tensors))}, "
              f"but a {config.architecture} SAE needs exactly {', '.join(sorted(expected))}.")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            _fail(f"tensor {name} in {file} has shape {list(tensors[name].shape)}, "
                  f"but d_in={config.d_in}, d_sae={config.d_sae} need {list(shape)}.")
    if read is not None:
        tensors, release = read()
    sae.load_state_dict(storage.cast_each(tensors, dtype, release), assign=True)
    left = [name for name, t in (*sae.named_parameters(), *sae.named_buffers()) if t.is_meta]
    if left:  # an architecture's tensor outside its tensor_names would stay unallocated
        raise RuntimeError(f"{type(sae).__name__} has tensors {left} that loading does not fill")
    return sae


# ----------------------------------------------------------------------------------------- hook names
# sparsify hooks Hugging Face modules by name: a decoder layer's output is the residual stream after
# the block; its mlp / attention submodules' outputs are what they add to the residual.
_HF_MODULE = re.compile(r"^(?:(?:model|transformer|gpt_neox|base_model)\.)*(?:layers|h)\.(\d+)(?:\.(\w+))?$")
_HF_KINDS = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out"}


def site_of(hook_name: str) -> str:
    """featopt's site name (`blocks.{l}.{kind}`) for a SAELens/TransformerLens hook name
    (`blocks.6.hook_resid_post`), featopt's own (`blocks.6.resid_post`) or a sparsify hookpoint
    (`layers.6`, `layers.6.mlp`, `h.6.attn`, `gpt_neox.layers.6.attention`, ...)."""
    name = str(hook_name).strip()
    match = _HF_MODULE.match(name)
    if match and match.group(2) in _HF_KINDS:
        return f"blocks.{int(match.group(1))}.{_HF_KINDS[match.group(2)]}"
    if not match and name.startswith("blocks."):
        try:
            return parse_site(name).name
        except FeatoptError:
            pass
    _fail(f"hook name {hook_name!r} names no featopt site: allowed are blocks.L.KIND (TransformerLens hook_ names too) "
          "and Hugging Face layer modules layers.L, layers.L.mlp, layers.L.self_attn (or h.L, ...).")
