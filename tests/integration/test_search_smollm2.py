"""Greedy search on the real SmolLM2-135M at layer 0: the document's claim that maximizing the
feature at the last position and maximizing its sum over all positions choose the same tokens.

The candidates are the first 2048 token ids (BPE's most frequent merges): the whole vocabulary of
49152 takes minutes per step on a CPU, and the causal argument behind the claim (earlier
positions never see later tokens, so the sum is a constant plus the last position) holds for any
candidate set.
"""

from __future__ import annotations

import pytest
import torch

from featopt.commands.search import GreedyConfig
from featopt.commands.search import greedy as run

pytestmark = pytest.mark.slow

CANDIDATES = 2048


def _block0_uncached(model, ids):
    """Block 0's output for full sequences `ids [B, T]`, from the plain HF modules with the later
    blocks removed for the call (a hook reads it before any final norm); nothing cached."""
    layers, seen = model.model.layers, {}
    handle = layers[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        model.model.layers = torch.nn.ModuleList([layers[0]])
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)  # the base model: no LM head over 49152 tokens
    finally:
        model.model.layers = layers
        handle.remove()
    out = seen["out"]
    return out[0] if isinstance(out, tuple) else out


def test_last_position_and_sum_over_positions_choose_the_same_tokens(smollm, tmp_path):
    config = GreedyConfig(model="smollm2-135m-instruct", layer=0, features="[:, :, 0-3]", tokens=3, variant="both",
                          candidates=f"0-{CANDIDATES - 1}", top_k=2, out=str(tmp_path), progress=False)
    results = run(config, smollm).results
    last = {r.spec: r for r in results if r.method == "greedy-last"}
    total = {r.spec: r for r in results if r.method == "greedy-sum"}
    differences = [f"{spec}: last {last[spec].tokens} vs sum {total[spec].tokens}" for spec in last
                   if last[spec].token_ids != total[spec].token_ids]
    assert not differences, "the variants differ:\n" + "\n".join(differences)

    # Independently, the document's uncached computation at the last step: every candidate after
    # the found two-token prefix, run in full; both variants' argmax must be the found token.
    candidates = torch.arange(CANDIDATES)
    for f, (spec, r) in enumerate(last.items()):
        prefix = torch.tensor(r.token_ids[:2])
        acts = _block0_uncached(smollm.model, torch.cat([prefix.expand(CANDIDATES, -1), candidates[:, None]], 1))[:, :, f]
        by_last, by_sum = int(acts[:, -1].argmax()), int(acts.sum(1).argmax())
        assert (by_last, by_sum) == (r.token_ids[2], r.token_ids[2]), (spec, r.tokens)
        assert r.activation == pytest.approx(float(acts[r.token_ids[2], -1]), rel=1e-4, abs=1e-5)
