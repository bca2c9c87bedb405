"""Output-matching inversion by gradients (source document 000, "Complete Search Features"): given
real texts, learn inputs whose outputs at a site match the texts' own outputs, `min ||O(e_n) -
O(e)||_1` (or the cosine of the flattened outputs), then decode them and count how many tokens
came back. `featopt invert` builds the run (`featopt.commands.invert`); this holds what is
specific to the gradient method: its progress callback and its records.

Each text is one problem (one row), padded to the longest; padded positions count nowhere (in a
causal model they cannot change the activations of the positions before them).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from featopt.gradient.decoding import nearest_decode, pinv_decoder, token_cosine
from featopt.gradient.metrics import ExactMatch, OutputDistance, TokenRecovery
from featopt.gradient.module import FeatureOptimization
from featopt.gradient.readout import decode_ids
from featopt.objectives.matching import Batch, token_matches
from featopt.objectives.objective import Context
from featopt.results import FeatureResult, versions
from featopt.cache import cache_dir


def _recovered(module: FeatureOptimization, batch: Batch, decoder: str) -> Tensor:
    """Decoded ids `[P, T]` with the pad id at padded positions (they are never scored)."""
    ids = decode_ids(module, decoder).cpu()
    return torch.where(batch.mask, ids, batch.ids)


class RecoveryCallback(L.Callback):
    """Every `every_n_steps` steps, decode and log token recovery and exact match to TensorBoard."""

    def __init__(self, batch: Batch, every_n_steps: int, decoder: str):
        self.batch, self.every, self.decoder = batch, max(1, every_n_steps), decoder

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step == trainer.max_steps or not trainer.is_global_zero or module.logger is None:
            return  # the last step is logged by run(), with the final metrics
        ids = _recovered(module, self.batch, self.decoder)
        recovery, exact = TokenRecovery(), ExactMatch()
        recovery.update(ids, self.batch.ids, self.batch.mask)
        exact.update(ids, self.batch.ids, self.batch.mask)
        module.logger.log_metrics({"inversion/token_recovery": float(recovery.compute()),
                                   "inversion/exact_match": float(exact.compute())}, step=step)


@torch.no_grad()
def evaluate(module: FeatureOptimization, batch: Batch, *, target: Tensor, kind: str, decoder: str, seed: int) -> tuple[list[FeatureResult], dict, Tensor]:
    """One result per text, the overall metrics (the output distance to `target [P, T, W]` by
    `kind`), and the recovered ids `[P, T]` (pad id at padding)."""
    adapter, site, objective = module.adapter, module.selection.site, module.objective
    embedding = adapter.embedding
    embeds = module.parametrization(None).detach().to(embedding.device)
    # Both decodings are scored, so decoders can be compared on one run; a prior's own tokens
    # (a simplex's argmax) are the answer when it has them.
    decoded = {"pinv": pinv_decoder(embedding, cache_dir()).decode(embeds).cpu(), "nearest": nearest_decode(embedding, embeds).cpu()}
    direct = module.parametrization.direct_ids()
    ids = torch.where(batch.mask, direct.cpu() if direct is not None else decoded[decoder], batch.ids)
    cosine = token_cosine(embedding, embeds, ids).cpu()
    sites = list(dict.fromkeys((site, *objective.sites)))
    with torch.autocast(adapter.device.type, enabled=False):  # full precision, whatever the training ran in
        found = {s: a.float() for s, a in adapter.run(sites, input_ids=ids, isolated=module.isolated, bos=adapter.bos).items()}
        made = {s: a.float() for s, a in adapter.run(sites, inputs_embeds=embeds, isolated=module.isolated,
                                                     bos=adapter.bos).items()}
    acts, cont = found[site], made[site]
    rows = torch.arange(len(batch.texts))
    distance = objective.loss(Context(found, embeds, rows, adapter)).cpu()
    cont_distance = objective.loss(Context(made, embeds, rows, adapter)).cpu()
    activation, cont_activation = module.selection.activation(acts, rows), module.selection.activation(cont, rows)
    correct, valid = token_matches(ids, batch.ids, batch.mask)
    recovery, exact, mean = TokenRecovery(), ExactMatch(), OutputDistance(kind)
    recovery.update(ids, batch.ids, batch.mask)
    exact.update(ids, batch.ids, batch.mask)
    mean.update(acts.cpu(), target.cpu(), batch.mask)
    metrics = {"token_recovery": float(recovery.compute()), "exact_match": float(exact.compute()),
               "distance": float(mean.compute()), "continuous_distance": float(cont_distance.mean()),
               "tokens": int(valid.sum()), "tokens_recovered": int(correct.sum()),
               "texts": len(batch.texts), "texts_recovered": int((correct == valid).sum())}
    for name, alt in decoded.items():
        metrics[f"token_recovery_{name}"] = float(token_matches(alt, batch.ids, batch.mask)[0].sum()) / metrics["tokens"]
    stamp, results = versions(), []
    for p, text in enumerate(batch.texts):
        n = int(valid[p])
        row = ids[p, :n].tolist()
        results.append(FeatureResult(
            spec=text, site=str(site), method="output-matching-inversion", objective=objective.description,
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=float(activation[p]), continuous_activation=float(cont_activation[p]),
            token_cosine=[round(float(c), 6) for c in cosine[p, :n]], nearest_token_ids=decoded["nearest"][p, :n].tolist(),
            pinv_nearest_agreement=float((decoded["nearest"][p, :n] == decoded["pinv"][p, :n]).float().mean()),
            model=adapter.name, bos=adapter.bos, seed=seed, dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"original_token_ids": batch.ids[p, :n].tolist(), "token_recovery": int(correct[p]) / n,
                   "tokens_recovered": int(correct[p]), "exact_match": bool(correct[p] == n),
                   "distance": float(distance[p]), "continuous_distance": float(cont_distance[p]),
                   "decoded_by": "simplex-argmax" if direct is not None else decoder,
                   "pinv_token_ids": decoded["pinv"][p, :n].tolist()},
        ))
    return results, metrics, ids
