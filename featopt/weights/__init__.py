"""Interpretability from the weights alone (source document 004, "Flash Interpretability").

- :mod:`~featopt.weights.decode`: `decode_directions(directions [N, d], Unembed.from_adapter(adapter,
  norm))` decodes any directions (MLP neurons' input weights, SAE decoder rows) through the LM head
  into their top-k tokens and probabilities, streamed: the `[N, vocab]` logits are never held.
- :mod:`~featopt.weights.neurons`: `neuron_weights(adapter, layer, which)` and `decode_model` (every
  layer), written by :mod:`~featopt.weights.store`.
- :mod:`~featopt.weights.find`: the paper's normalized probability of a token at every neuron and
  the best neurons over the whole model (`best_neurons`; `from_saved` reuses a decode run).
- :mod:`~featopt.weights.compare`: `compare(a, b)`, the share of neurons whose top token two
  checkpoints of the same shape share.
- :mod:`~featopt.plots`: the paper's Figures 2 and 3 as PNG files.

The commands (`featopt neurons decode|find|compare`) are :mod:`featopt.commands.neurons`; clamping
a neuron while the model runs lives in :mod:`featopt.interventions`.
"""
