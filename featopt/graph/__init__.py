"""Attribution graphs (Anthropic's "Circuit Tracing", 2025; circuit-tracer): on one prompt, every MLP
replaced by a transcoder plus an error term, attention patterns and normalisation scales frozen at
their values on the prompt, so the model is linear in its feature activations; the direct effect
of every active feature, error node and token embedding on every feature and chosen logit.

- `replacement.py`: the frozen, linearised replacement model of a prompt (:class:`ReplacementModel`;
  the freezing itself is `featopt/models/linearize.py`);
- `attribution.py`: the adjacency matrix of direct effects, by batched backward passes;
- `pruning.py`: influence on the logits, pruning, the replacement and completeness scores;
- `files.py`: the graph as safetensors, circuit-tracer's frontend JSON and GraphML;
- `build.py`: one graph from a prompt, checked and written (`build_graph`).
"""
