"""An SAE's encoder read out other than by its latents, as feature maps for the searches."""

from __future__ import annotations

from torch import Tensor


class PreActivations:
    """An SAE's encoder pre-activations `[..., d_sae]` as a feature map.

    Gradient methods get no gradient from a latent that is off (a topk latent outside the k
    largest, a relu latent below zero), and at a random start nearly every latent is off. Its
    pre-activation is the same linear read-out without the cut, equal to the latent wherever the
    latent fires (relu, and topk within the k largest), so ascent on it climbs towards inputs
    that fire the latent; the found inputs are then re-measured on the latent itself.
    """

    def __init__(self, sae):
        self.sae = sae
        self.d_in, self.width = sae.d_in, sae.d_sae

    def features(self, acts: Tensor) -> Tensor:
        return self.sae.pre_acts(acts).to(acts.dtype)

    def describe(self) -> dict:
        return {**self.sae.describe(), "readout": "pre-activation"}


class FiringScores:
    """An SAE's `firing_score` `[..., d_sae]` as a feature map: equal to
    each latent where it fires, and below zero, by the distance to firing, where it does not (the
    searches for inputs that fire latents climb it; every answer is re-measured on the latent)."""

    def __init__(self, sae):
        self.sae = sae
        self.d_in, self.width = sae.d_in, sae.d_sae

    def features(self, acts: Tensor) -> Tensor:
        return self.sae.firing_score(acts).to(acts.dtype)

    def describe(self) -> dict:
        return {**self.sae.describe(), "readout": "firing score"}
