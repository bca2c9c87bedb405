"""From an optimized input to answers: decode to tokens, then re-measure the tokens.

The continuous input can reach activations no real text reaches, so every result also
carries the activation of its decoded tokens measured by a fresh forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.cache import cache_dir
from featopt.gradient.decoding import agreement, nearest_decode, pinv_decoder, token_cosine
from featopt.gradient.module import FeatureOptimization
from featopt.objectives.objective import Context
from featopt.results import FeatureResult, versions

DECODERS = ("pinv", "nearest")


def decode_ids(module: FeatureOptimization, decoder: str = "pinv") -> Tensor:
    """Token ids `[problems, tokens]` for the current input: the parametrization's own ids when
    it has them (a simplex), else its embeddings decoded by `decoder`."""
    direct = module.parametrization.direct_ids()
    if direct is not None:
        return direct
    embedding = module.adapter.embedding
    embeds = module.parametrization(None).detach().to(embedding.device)
    if decoder == "pinv":
        return pinv_decoder(embedding, cache_dir()).decode(embeds)
    return nearest_decode(embedding, embeds)


def decoded_texts(module: FeatureOptimization, ids: Tensor) -> list[str]:
    return [module.adapter.decode(row.tolist()) for row in ids]


@torch.no_grad()
def measure(module: FeatureOptimization, *, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
    """Selected activation per problem `[problems]`, full precision, outside any autocast."""
    adapter, site = module.adapter, module.selection.site
    with torch.autocast(adapter.device.type, enabled=False):
        acts = adapter.run([site], input_ids=input_ids, inputs_embeds=inputs_embeds, isolated=module.isolated,
                           bos=adapter.bos)[site]
    return module.selection.activation(acts.float())


@torch.no_grad()
def score(module: FeatureOptimization, ids: Tensor, acts: dict) -> Tensor:
    """The objective's score (minus its loss) of token ids `[problems, tokens]`, problem p on row p,
    from their activations `acts` (a plain forward in full precision, holding every site the
    objective reads): the number a discrete search would report for them."""
    adapter, objective = module.adapter, module.objective
    rows = torch.arange(len(ids), device=adapter.device)
    embeds = adapter.embedding[ids.to(adapter.device)].float()  # what a penalty on the input sees of real tokens
    with torch.autocast(adapter.device.type, enabled=False):
        return -objective.loss(Context({s: acts[s].float() for s in objective.sites}, embeds, rows, adapter)).float()


@torch.no_grad()
def evaluate(
    module: FeatureOptimization, method: str, *, decoder: str = "pinv", seed: int | None = None, dtype: str = ""
) -> tuple[list[FeatureResult], Tensor]:
    """One :class:`FeatureResult` per problem and the decoded ids `[problems, tokens]`."""
    adapter = module.adapter
    embedding = adapter.embedding
    embeds = module.parametrization(None).detach().to(embedding.device)
    direct = module.parametrization.direct_ids()
    pinv = pinv_decoder(embedding, cache_dir()).decode(embeds)
    nearest = nearest_decode(embedding, embeds)
    # The answer: a prior's own tokens (a simplex's argmax) when it has them, else the decoder's.
    ids = direct if direct is not None else (pinv if decoder == "pinv" else nearest)
    agree = agreement(pinv, nearest)
    cosine = token_cosine(embedding, embeds, ids)
    site = module.selection.site  # one forward of the answer for the selection and the objective
    with torch.autocast(adapter.device.type, enabled=False):
        found = adapter.run(list(dict.fromkeys((site, *module.objective.sites))), input_ids=ids,
                            isolated=module.isolated, bos=adapter.bos)
    discrete = module.selection.activation(found[site].float())
    scores = score(module, ids, found)
    continuous = measure(module, inputs_embeds=embeds)
    # Every decoding is re-measured too, so decoders can be compared on the same run.
    alternatives = {"pinv": pinv, "nearest": nearest}
    alt_acts = {name: (discrete if alt is ids else measure(module, input_ids=alt)) for name, alt in alternatives.items()}
    stamp = versions()
    results = []
    for p, problem in enumerate(module.selection.problems):
        row = ids[p].tolist()
        results.append(FeatureResult(
            spec=problem.spec,
            site=str(module.selection.site),
            method=method,
            objective=module.objective.description,
            token_ids=row,
            tokens=[adapter.decode([t]) for t in row],
            text=adapter.decode(row),
            activation=float(discrete[p]),
            continuous_activation=float(continuous[p]),
            token_cosine=[round(float(c), 6) for c in cosine[p]],
            nearest_token_ids=nearest[p].tolist(),
            pinv_nearest_agreement=float(agree[p]),
            model=adapter.name, bos=adapter.bos,
            feature_map=adapter.describe_features(module.selection.site),
            seed=seed,
            dtype=dtype or str(adapter.dtype).replace("torch.", ""),
            versions=stamp,
            extra={
                "score": float(scores[p]),
                "decoded_by": "simplex-argmax" if direct is not None else decoder,
                "pinv_token_ids": pinv[p].tolist(),
                "pinv_activation": float(alt_acts["pinv"][p]),
                "nearest_activation": float(alt_acts["nearest"][p]),
                **({"direct_pinv_agreement": float(agreement(direct[p:p + 1], pinv[p:p + 1])[0])} if direct is not None else {}),
            },
        ))
    return results, ids
