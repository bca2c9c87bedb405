"""One attribution graph from a prompt, checked and written: the Python entry point that
`featopt graph build` will call.

`build_graph(adapter, transcoders, prompt, out)` checks its inputs before any work (one sentence
each: a prompt longer than the model's context, a `target` that is not one token of the vocabulary,
thresholds outside (0, 1], a transcoder set that does not fit the model, a graph whose dense
adjacency would not fit in free memory), computes the graph
(`adjacency.py`), prunes it and scores it (`pruning.py`), and writes into `out`, each file whole
or not at all:

- `graph.safetensors`: the whole graph (`files.load_graph` reads it back);
- `graph.json`: the pruned graph in circuit-tracer's frontend layout, and `graph.graphml` the same;
- `summary.json`: the scores, node and edge counts, wall time, and the run's record (model, prompt,
  transcoders, settings, torch and featopt versions).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from featopt.atomic import atomic_write
from featopt.errors import FeatoptError
from featopt.attribution.adjacency import attribute
from featopt.attribution.files import graph_json, save_graph, write_graph_json, write_graphml
from featopt.attribution.paths import lens_tokens, path_words, top_path
from featopt.attribution.pruning import EDGE_THRESHOLD, NODE_THRESHOLD, check_threshold, logit_influence, prune, scores
from featopt.attribution.replacement import ReplacementModel
from featopt.models import ModelAdapter
from featopt.models.sae import SparseAutoencoder
from featopt.models.sae.formats import load_sae
from featopt.results import versions


def load_transcoders(folder: str | Path) -> list[SparseAutoencoder]:
    """Every SAE folder directly inside `folder` (as `sae train --site blocks.0-29.mlp_in --target_site
    mlp_out` writes them), or `folder` itself when it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FeatoptError(f"transcoder folder {folder} does not exist: give the folder `sae train` wrote.")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
    if not subfolders:
        return [load_sae(folder)]
    return [load_sae(p) for p in subfolders]


def target_id(adapter: ModelAdapter, target: str) -> int:
    """The token id of `target`, which must be one token of the model's vocabulary."""
    ids = adapter.encode(target, bos=False)
    if len(ids) != 1:
        raise FeatoptError(f"--target {target!r} is {len(ids)} tokens for {adapter.name}: give a string that is exactly "
                           f"one token of its vocabulary.")
    return int(ids[0])


def in_words(adapter: ModelAdapter, transcoders: Sequence[SparseAutoencoder], graph, pruned) -> tuple[dict[int, str], dict]:
    """`(labels, top path)`: each kept feature's label (the tokens it writes, `paths.lens_tokens`),
    and the top path (`paths.top_path`) as `{"nodes": [...], "words": "..."}`."""
    decode = lambda t: adapter.decode([t])  # noqa: E731
    kept = torch.nonzero(pruned.nodes[:len(graph.features)]).flatten().tolist()
    lens = dict(zip(kept, lens_tokens(transcoders, adapter.lm_head.weight, graph.features[kept])))
    writes = lambda i: [decode(t) for t in lens[i]]  # noqa: E731
    labels = {i: "writes " + ", ".join(repr(w) for w in writes(i)) for i in kept}
    path = top_path(graph, pruned)
    tokens = [decode(int(t)) for t in graph.input_ids]
    return labels, {"nodes": path, "words": path_words(graph, path, tokens, writes, decode)}


def build_graph(adapter: ModelAdapter, transcoders: Sequence[SparseAutoencoder], prompt: str, out: str | Path, *,
                target: str | None = None, max_logits: int = 10, desired_prob: float = 0.95,
                node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD, batch_size: int = 32,
                slug: str = "graph", scan: str = "featopt", progress=None, transcoder_folder: str | None = None,
                skip_first: int = 1) -> dict:
    """Compute, prune, score and write the attribution graph of `prompt` (see the module docstring);
    returns the summary. `skip_first`: leading positions whose features and errors are no nodes
    (see :class:`ReplacementModel`; 1, as circuit-tracer, with the adapter's BOS token first)."""
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    model = ReplacementModel(adapter, transcoders, skip_first=skip_first)
    ids = adapter.encode(prompt)  # after BOS when the adapter's --bos says so
    if len(ids) == 0:
        raise FeatoptError("the prompt is empty: give the text whose next token the graph explains.")
    adapter.check_positions(len(ids), "the prompt", "give a shorter prompt")
    if skip_first >= len(ids):
        raise FeatoptError(f"--skip_first {skip_first} leaves out every position of the prompt ({len(ids)} tokens): "
                           "give a smaller one or a longer prompt.")
    logit_ids = torch.tensor([target_id(adapter, target)]) if target is not None else None
    out = Path(out)
    start = time.perf_counter()
    graph = attribute(model, ids, logit_ids=logit_ids, max_logits=max_logits, desired_prob=desired_prob,
                      batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    node_influence = logit_influence(graph)  # pruning and the scores share it
    pruned = prune(graph, node_threshold, edge_threshold, node_influence)
    replacement, completeness = scores(graph, node_influence)
    decode = lambda t: adapter.decode([t])  # noqa: E731
    tokens = [decode(int(t)) for t in ids]
    labels, path = in_words(adapter, model.transcoders, graph, pruned)
    names = [tc.cfg.hook_name for tc in model.transcoders]
    doc = graph_json(graph, pruned, decode, slug=slug, scan=scan, transcoders=names, node_threshold=node_threshold,
                     labels=labels)
    summary = {
        "prompt": prompt, "tokens": tokens, "model": adapter.name,
        "transcoder_folder": transcoder_folder,
        "transcoders": [{"hook_name": tc.cfg.hook_name, "sha256": tc.content_hash()} for tc in model.transcoders],
        "logits": [{"token": decode(int(t)), "id": int(t), "probability": float(p)} for t, p in zip(graph.logit_ids, graph.logit_probs)],
        "replacement_score": replacement, "completeness_score": completeness,
        "top_path": path,
        "nodes": {"features": len(graph.features), "all": len(graph.adjacency), "kept": int(pruned.nodes.sum())},
        "edges": {"nonzero": int((graph.adjacency != 0).sum()), "kept": int(pruned.edges.sum())},
        "settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold, "max_logits": max_logits,
                     "desired_prob": desired_prob, "target": target, "batch_size": batch_size, "bos": adapter.bos,
                     "skip_first": skip_first},
        "check": graph.check,
        "attribution_seconds": seconds, "dtype": str(adapter.dtype).removeprefix("torch."), "versions": versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_graph(graph, out / "graph.safetensors")
    write_graph_json(doc, out / "graph.json")
    write_graphml(doc, out / "graph.graphml")
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return summary
