"""Interpretability from the weights alone (source document 004, "Flash Interpretability").

- :mod:`~featopt.weights.decode`: `decode_directions(directions [N, d], Unembed.from_adapter(adapter,
  norm))` decodes any directions (MLP neurons' input weights, SAE decoder rows) through the LM head
  into their top-k tokens and probabilities, streamed: the `[N, vocab]` logits are never held.
- :mod:`~featopt.weights.neurons`: `neuron_weights(adapter, layer, which)`, `decode_model` (every
  layer) and `run_decode(DecodeConfig)`, written by :mod:`~featopt.weights.store`.
- :mod:`~featopt.weights.find`: `run_find(FindConfig)`, the paper's normalized probability of a token
  at every neuron and the best neurons over the whole model.
- :mod:`~featopt.weights.compare`: `run_compare(CompareConfig)`, the share of neurons whose top token
  two checkpoints of the same shape share.
- :mod:`~featopt.plots`: the paper's Figures 2 and 3 as PNG files.

Clamping a neuron while the model runs lives in :mod:`featopt.interventions`.
"""
