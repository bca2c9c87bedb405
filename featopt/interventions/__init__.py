"""Editing activations during a forward, through the adapter's write hooks (always removed).

One mechanism for every intervention featopt makes:

- :mod:`~featopt.interventions.edits`: the edits themselves, each a write function for one site
  (scale or remove SAE latents, add a direction, project a direction out), and :func:`edited`,
  the context manager that installs any number of them on any number of sites at once;
- :mod:`~featopt.interventions.clamp`: hold an MLP neuron at a value (document 004) and sweep it
  (`featopt neurons clamp` is :mod:`featopt.commands.clamp`);
- :mod:`~featopt.interventions.generate`: greedy or sampled generation with the KV cache while
  edits are installed (clamped neurons, steered features).
"""

from featopt.interventions.clamp import (
    MULTI, chat_prompt, check_neuron, clamp, clamp_sweep, parse_values, sequence_probs, target_ids,
)
from featopt.interventions.edits import Edit, add_direction, edited, project_out, scale_latents
from featopt.interventions.generate import generate

__all__ = [
    "MULTI", "Edit", "add_direction", "chat_prompt", "check_neuron", "clamp", "clamp_sweep", "edited", "generate",
    "parse_values", "project_out", "scale_latents", "sequence_probs", "target_ids",
]
