"""Attribution graphs (Anthropic's "Circuit Tracing", 2025; circuit-tracer): on one prompt, every MLP
replaced by a transcoder plus an error term, attention patterns and normalisation scales frozen at
their values on the prompt, so the model is linear in its feature activations; the direct effect
of every active feature, error node and token embedding on every feature and chosen logit.

- `replacement.py`: the frozen, linearised replacement model of a prompt (:class:`ReplacementModel`;
  the freezing itself is `featopt/models/linearize.py`);
- `adjacency.py`: the adjacency matrix of direct effects, by batched backward passes;
- `pruning.py`: influence on the logits, pruning, the replacement and completeness scores;
- `files.py`: the graph as safetensors, circuit-tracer's frontend JSON and GraphML;
- `paths.py`: the graph in words: what each feature writes (logit lens), the top path;
- `build.py`: one graph from a prompt, checked and written (`build_graph`);
- `intervene.py`: interventions that test a graph (predicted against measured logit changes);
- `page.py`, `plot.py`: the graph as a static HTML page and as a PNG.

The commands over it are `featopt graph build|intervene|view` (`featopt.commands.graph`, and
`featopt.graph` in Python).
"""
