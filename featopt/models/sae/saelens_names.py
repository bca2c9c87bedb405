"""How each featopt architecture is named in SAELens' cfg.json, both ways (sae-lens 6.54).

- SAEs: the class' `saelens_name` ("standard" for relu, "topk", "jumprelu"). BatchTopK and
  Matryoshka are saved as sae-lens saves them for inference, as "jumprelu" (their threshold),
  with `metadata.training_architecture` ("batchtopk", "matryoshka_batchtopk") and
  `metadata.training_architecture_details` (`k`, `matryoshka_widths`) naming what was trained;
  featopt reads those back into its batchtopk and matryoshka classes.
- Transcoders (`target_hook_name` set): sae-lens' "transcoder" (relu), "jumprelu_transcoder"
  (jumprelu, and the batchtopk-trained ones) and their "skip_" variants, with top-level `d_out`,
  `apply_b_dec_to_input: false` and `metadata.hook_name_out`. sae-lens has no topk transcoder:
  featopt's is saved as "topk_transcoder" (with `k`), which featopt and sparsify-style readers
  load and sae-lens refuses; train a batchtopk transcoder for one sae-lens and circuit-tracer load.
"""

from __future__ import annotations

from featopt.errors import FeatoptError

#: sae-lens' transcoder names by the activation they run, skip connection or not
_TRANSCODERS = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
                ("topk", False): "topk_transcoder", ("topk", True): "topk_skip_transcoder"}
#: featopt architectures that infer as another's rule (batchtopk and matryoshka run as jumprelu)
_INFERS_AS = {"batchtopk": "jumprelu", "matryoshka": "jumprelu"}
#: sae-lens' training_architecture for featopt's name
_TRAINED_AS = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}


def saelens_architecture(sae) -> tuple[str, dict, dict]:
    """`(cfg.json "architecture", extra top-level fields, extra metadata)` for `sae`."""
    cfg, fields, meta = sae.cfg, dict(sae.saelens_fields()), {}
    if cfg.architecture in _TRAINED_AS:
        details = {"k": cfg.k, **({"matryoshka_widths": list(cfg.matryoshka)} if cfg.matryoshka else {})}
        meta = {"training_architecture": _TRAINED_AS[cfg.architecture], "training_architecture_details": details}
    if not sae.is_transcoder:
        return type(sae).saelens_name, fields, meta
    rule = _INFERS_AS.get(cfg.architecture, cfg.architecture)
    if rule == "topk":
        fields = {"k": cfg.k}
    return _TRANSCODERS[(rule, bool(cfg.skip))], {**fields, "d_out": cfg.d_out}, meta


def read_architecture(arch: str, meta: dict, known: dict) -> tuple[type, dict]:
    """The featopt class and config fields (`skip`, `k`, `matryoshka`; for transcoders also read
    `d_out` by the caller) for cfg.json's `arch` and `metadata` `meta`; `known`: classes by sae-lens name."""
    fields: dict = {}
    for (rule, skip), name in _TRANSCODERS.items():
        if arch == name:
            arch, fields = ("standard" if rule == "relu" else rule), {"skip": skip}
    trained = meta.get("training_architecture")
    details = meta.get("training_architecture_details") if isinstance(meta.get("training_architecture_details"), dict) else {}
    by_trained = {v: k for k, v in _TRAINED_AS.items()}
    if arch == "jumprelu" and trained in by_trained:
        from featopt.models.sae.model import architecture

        cls = architecture(by_trained[trained])
        k = details.get("k")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise FeatoptError(f"a {trained} SAE's metadata.training_architecture_details needs an integer k, got {k!r}.")
        fields["k"] = k
        if cls.name == "matryoshka":
            fields["matryoshka"] = tuple(details.get("matryoshka_widths") or ())
        return cls, fields
    if arch not in known:
        return None, fields
    return known[arch], fields
