"""Every command, registered in one place: the command line (`featopt.cli`) and the Python API
(`featopt.optimize`, `featopt.search.gcg`, ...) are both built from this table.

A command is a config dataclass (its fields are the flags, their docstrings the help) and a
`run(config, adapter=None)` that returns a result object (`CommandResult`: it prints the table
and renders in Jupyter). Entries name them by module and attribute, imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One command: `name` as typed ("search gcg"), where its config class and run function live,
    what it does in one line, and the fields a Python call may pass positionally."""

    name: str
    module: str
    config_name: str
    run_name: str
    summary: str
    positional: tuple[str, ...] = ()

    @property
    def config(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def run(self):
        return getattr(importlib.import_module(self.module), self.run_name)

    @property
    def group(self) -> str | None:
        return self.name.split()[0] if " " in self.name else None

    @property
    def leaf(self) -> str:
        return self.name.split()[-1]


#: The command groups (`featopt search ...`) and what they hold.
GROUPS = {
    "search": "Discrete searches over real tokens, batched, with early exit at the deepest site read.",
    "neurons": "MLP neurons read through the LM head, and clamped (Flash Interpretability).",
    "sae": "Sparse autoencoders: train (several from one pass), cache activations, evaluate, read latents.",
    "flow": "Feature flow across layers (document 003): match SAE features by decoder cosine, graphs, "
            "predecessor groups, deactivation, steering.",
    "graph": "Attribution graphs over per-layer transcoders (Circuit Tracing): build, intervene, view.",
}

_C = "featopt.commands."
COMMANDS = [
    Command("optimize", _C + "optimize", "AscentConfig", "optimize",
            "Gradient ascent on input embeddings (or a softmax simplex) towards the objective, decoded to tokens.",
            ("objective",)),
    Command("invert", _C + "invert", "InversionConfig", "invert",
            "Output-matching inversion: inputs whose outputs at a site match those of the given texts.", ("texts",)),
    Command("search exhaustive", _C + "search", "ExhaustiveConfig", "exhaustive",
            "Every vocabulary token as a one-token input (after an optional prefix); every problem scored in one sweep.",
            ("objective",)),
    Command("search greedy", _C + "search", "GreedyConfig", "greedy",
            "Left-to-right greedy search: each step appends the token that scores best.", ("objective",)),
    Command("search gcg", _C + "swaps", "GCGConfig", "gcg",
            "GCG: token gradients propose swaps, a batch of swaps is scored exactly, the best is kept (N tokens).",
            ("objective",)),
    Command("search epo", _C + "swaps", "EPOConfig", "epo",
            "EPO fluent search: one member per lambda, score - lambda * xent, a Pareto front per problem (JSON, PNG).",
            ("objective",)),
    Command("compare", _C + "compare", "CompareConfig", "compare",
            "Gradient methods' decoded tokens as a fraction of the exhaustive optimum (one-token inputs).", ("objective",)),
    Command("align", _C + "align", "AlignConfig", "align",
            "Top-k overlap of each feature index's exhaustive top tokens across layers, against a shuffled baseline."),
    Command("neurons decode", _C + "neurons", "DecodeConfig", "decode",
            "Every MLP neuron's input weights through the LM head: top-k tokens and probabilities, streamed."),
    Command("neurons find", _C + "neurons", "FindConfig", "find",
            "The neurons most specialised for a token (normalized probability), with a PNG across layers."),
    Command("neurons compare", _C + "neurons", "CompareConfig", "compare",
            "Share of neurons whose top token is the same in two models of the same shape."),
    Command("neurons clamp", _C + "clamp", "ClampConfig", "clamp",
            "Clamp a neuron over a sweep of values and record a target token's probability (PNG); --generate."),
    Command("sae train", _C + "sae_train", "TrainConfig", "train",
            "Train SAEs (relu or topk; several sizes or sites from one pass of the model) in SAELens' format."),
    Command("sae cache", _C + "sae_cache", "CacheConfig", "cache",
            "Save a corpus' activations at a site as safetensors shards, to train from with --activations."),
    Command("sae eval", _C + "sae_eval", "EvalConfig", "evaluate",
            "FVU, L0, dead fraction and CE loss recovered of SAEs on held-out text; writes metrics.json."),
    Command("sae features", _C + "sae_read", "FeaturesConfig", "features",
            "Every latent's top and uniform (binned) examples, frequency and histogram over a corpus, in one pass."),
    Command("sae lens", _C + "sae_read", "LensConfig", "lens",
            "Logit lens: decoder directions through the unembedding, high-norm tokens removed."),
    Command("sae ablate", _C + "sae_ablate", "AblateConfig", "ablate",
            "Ablated text (drop each earlier token) and direction ablation (next-token log-probs) for one latent."),
    Command("sae mcs", _C + "sae_read", "MCSConfig", "mcs",
            "Max cosine similarity of each latent with the decoder rows of other dictionaries (1x/2x/4x/8x)."),
    Command("sae inputs", _C + "sae_inputs", "InputsConfig", "inputs",
            "Inputs that fire each latent (neuron, direction) hardest, and fluently, beside its corpus max (pooled EPO)."),
    Command("sae dashboard", _C + "sae_dashboard", "DashboardConfig", "dashboard",
            "A static site (file://) per latent: examples, histogram, logit lens, ablations, maximizing inputs."),
    Command("flow match", _C + "flow_match", "MatchConfig", "match",
            "Every feature's top-k matches by decoder cosine in its predecessor SAEs, against a baseline."),
    Command("flow graph", _C + "flow_match", "GraphConfig", "graph",
            "A feature's flow graph: matches followed backwards and forwards through all SAEs (JSON, GraphML, PNG)."),
    Command("flow groups", _C + "flow_corpus", "GroupsConfig", "groups",
            "Predecessor groups (From RES/MLP/ATT, ..., nowhere) over a corpus: shares per layer, transitions."),
    Command("flow transition", _C + "flow_corpus", "TransitionConfig", "transition",
            "Explained variance of layer L+1's latents from layer L's via the top-1 cosine transition matrix."),
    Command("flow deactivate", _C + "flow_corpus", "DeactivateConfig", "deactivate",
            "Deactivate top-1 vs random predecessors and measure the feature; sweep r against the loss."),
    Command("flow steer", _C + "flow_steer", "SteerConfig", "steer",
            "Single-layer vs multi-layer (flow graph) steering during generation: theme score against coherence."),
    Command("graph build", _C + "graph", "BuildConfig", "build",
            "One prompt's attribution graph over per-layer transcoders: checked, pruned, scored (JSON, GraphML, HTML, PNG).",
            ("prompt",)),
    Command("graph intervene", _C + "graph", "InterveneConfig", "intervene",
            "Scale or zero graph features: the logit changes the graph predicts beside the model's (errors frozen, not)."),
    Command("graph view", _C + "graph", "ViewConfig", "view",
            "A graph's HTML page (nodes by layer and position, weights on hover, latent pages) and PNG, again."),
    Command("demo", _C + "demo", "DemoConfig", "demo",
            "A few minutes of featopt: the same features answered by gradient ascent, the exhaustive sweep and GCG."),
]

BY_NAME = {command.name: command for command in COMMANDS}


def command(name: str) -> Command:
    """The command typed `name` ("search gcg")."""
    return BY_NAME[name]
