"""The `featopt` command. Subcommands parse flags or a YAML recipe (`--config`, Lightning's
jsonargparse config system) into a method's config dataclass and call its `run`.

Bad input ends in one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import warnings
from dataclasses import MISSING, fields
from typing import get_type_hints

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from featopt.errors import FeatoptError

_HELP = {
    "model": "built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id",
    "layer": "block index, 0-based (the documents' Block 1 is layer 0)",
    "site": "resid_post (default), resid_pre, attn_out, mlp_out, mlp_hidden, or blocks.L.KIND",
    "features": 'feature spec: "[:, :, 0-4]" five problems, "[:, :, 0:4]" one combined, "[:, 0-4, 7]" per position',
    "tokens": "number of input tokens",
    "steps": "optimization steps",
    "lr": "Adam learning rate",
    "target": "the constant C of the L1 objective ||C - O_f(e)||_1",
    "objective": "l1 (the documents') or maximize",
    "isolated": "run the block alone on the input, without the blocks before it",
    "untrained": "re-initialize the model from its config under --seed",
    "bos": "start the model input with the tokenizer's BOS token, a fixed first token the search never "
           "changes (default off: the source documents encode without one)",
    "trust_remote_code": "allow a model folder or hub id to run its own Python code (default off)",
    "init": "start from the embeddings of this text instead of random ones",
    "prior": "embedding (free input embeddings, the documents' method) or simplex (softmax over the vocabulary)",
    "temperature": "simplex softmax temperature at the start",
    "temperature_end": "simplex temperature at the end (default: constant)",
    "simplex_mode": "softmax (free logits) or projected (the documents' softmax after every step)",
    "decoder": "pinv (Moore-Penrose pseudoinverse) or nearest (cosine)",
    "seed": "random seed (init and untrained weights)",
    "precision": "32-true, bf16-mixed, 16-mixed or 64-true",
    "devices": "number of devices (processes); problems are sharded across them",
    "accelerator": "auto, cpu, gpu",
    "strategy": "auto (ddp_spawn on CPU, ddp on GPU when devices > 1) or any Lightning strategy",
    "out": "output folder (default featopt-runs/<time>)",
    "decode_every": "decode and log the text every N steps",
    "log_every": "log scalars every N steps",
    "checkpoint_every": "save a checkpoint every N steps (0: never)",
    "resume": "checkpoint file to resume from",
    "progress": "show the progress bar",
    "sae": "an SAE folder (SAELens, sparsify or Gemma Scope format): its latents are the features, at its own site",
}


class _Parser(ArgumentParser):
    """jsonargparse's parser, but a bad flag ends in one line on stderr and exit status 2."""

    def error(self, message, ex=None):
        sys.stderr.write(f"featopt: error: {' '.join(str(message).split())} (see --help)\n")
        sys.exit(2)


def _add_config_arguments(parser: ArgumentParser, config_cls, helps: dict | None = None) -> None:
    """One flag per field of a method's config dataclass; booleans get `--x/--no_x`. `helps`
    overrides the shared help texts for this command."""
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe with any of these options")
    hints = get_type_hints(config_cls)
    helps = {**_HELP, **_field_comments(config_cls), **(helps or {})}
    for f in fields(config_cls):
        # A field with a default_factory (a list) has no plain default: build it.
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        flag = f"--{f.name.rstrip('_')}"  # a field `from_` (a Python keyword) is the flag --from
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=ActionYesNo, default=default, help=helps.get(f.name, ""))
        else:
            parser.add_argument(flag, dest=f.name, type=hints[f.name], default=default, help=helps.get(f.name, ""))


_FIELD_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.+?)\s*$")


def _field_comments(config_cls) -> dict[str, str]:
    """Each field's trailing comment in the config's source (`lr: float = 0.01  # Adam's step`),
    the help of its flag: the comment is written for the reader of the dataclass, and so a
    field whose name means something else elsewhere (`--target` of `neurons clamp` is a token,
    not the L1 constant) never borrows another command's help."""
    try:
        lines = inspect.getsource(config_cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(config_cls)}
    found = {}
    for line in lines:
        match = _FIELD_COMMENT.match(line)
        if match and match.group(1) in names:
            found[match.group(1)] = match.group(2)
    return found


def build_parser() -> ArgumentParser:
    from featopt.gradient.ascent import AscentConfig

    parser = _Parser(prog="featopt", description="Find the inputs that make a feature of a language model fire.")
    sub = parser.add_subcommands(dest="command", required=True)
    optimize = _Parser(description="Embedding ascent towards ||C - O_f(e)||_1, decoded by pseudoinverse.")
    _add_config_arguments(optimize, AscentConfig)
    sub.add_subcommand("optimize", optimize, help="gradient ascent on input embeddings")
    demo = _Parser(description="A short showcase on the best model available offline.")
    demo.add_argument("--out", type=str, default="featopt-runs/demo", help="output folder")
    demo.add_argument("--steps", type=int, default=None, help="optimization steps (default depends on the model)")
    sub.add_subcommand("demo", demo, help="a short showcase of what featopt does")
    sub.add_subcommand("invert", _invert_parser(), help="recover texts from their outputs at a site")
    search = _Parser(description="Discrete searches over real tokens, batched, with early exit at the site.")
    sub.add_subcommand("search", search, help="discrete searches over real tokens")
    # jsonargparse wants nested subcommands added after their parent is attached.
    kinds = search.add_subcommands(dest="kind", required=True)
    for kind, (module, config_name, description) in _SEARCHES.items():
        kinds.add_subcommand(kind, _config_parser(module, config_name, description), help=description)
    sub.add_subcommand("compare", _config_parser("featopt.commands.compare", "CompareConfig",
                       "Gradient methods' decoded tokens as a fraction of the exhaustive optimum (one-token inputs)."),
                       help="is gradient feature visualization accurate? (vs exhaustive search)")
    sub.add_subcommand("align", _config_parser("featopt.discrete.align", "AlignConfig",
                       "Top-k overlap of each feature index's exhaustive top tokens across layers, against a "
                       "shuffled baseline (JSON, heatmap PNG).", _ALIGN_HELP),
                       help="are the features of one index aligned across layers? (exhaustive top-k overlap)")
    neurons = _Parser(description="MLP neurons read through the LM head, and clamped (Flash Interpretability).")
    sub.add_subcommand("neurons", neurons, help="decode, find, compare and clamp MLP neurons")
    tasks = neurons.add_subcommands(dest="task", required=True)
    for task, (module, config_name, _, _, description) in _NEURONS.items():
        tasks.add_subcommand(task, _config_parser(module, config_name, description), help=description)
    sae = _Parser(description="Sparse autoencoders: train (several from one pass), cache activations, evaluate.")
    sub.add_subcommand("sae", sae, help="train, cache and evaluate sparse autoencoders")
    sae_tasks = sae.add_subcommands(dest="task", required=True)
    for task, (module, config_name, _, _, description) in _SAE.items():
        helps = {**_SAE_HELP, **_SAE_TASK_HELP.get(task, {})}
        sae_tasks.add_subcommand(task, _config_parser(module, config_name, description, helps), help=description)
    flow = _Parser(description="Feature flow across layers (document 003): match SAE features by decoder cosine, "
                   "graphs, predecessor groups, deactivation, steering.")
    sub.add_subcommand("flow", flow, help="SAE feature flow across layers: match, graph, groups, deactivate, steer")
    flow_tasks = flow.add_subcommands(dest="task", required=True)
    for task, (module, config_name, _, _, description) in _FLOW.items():
        flow_tasks.add_subcommand(task, _config_parser(module, config_name, description, _FLOW_HELP), help=description)
    return parser


# task -> (module, config class, run function, format function, description)
_NEURONS = {
    "decode": ("featopt.weights.neurons", "DecodeConfig", "run_decode", "format_decode",
               "Every MLP neuron's input weights through the LM head: top-k tokens and probabilities, streamed."),
    "find": ("featopt.weights.find", "FindConfig", "run_find", "format_find",
             "The neurons most specialised for a token (normalized probability), with a PNG across layers."),
    "compare": ("featopt.weights.compare", "CompareConfig", "run_compare", "format_compare",
                "Share of neurons whose top token is the same in two models of the same shape."),
    "clamp": ("featopt.interventions", "ClampConfig", "run_clamp", "format_clamp",
              "Clamp a neuron over a sweep of values and record a target token's probability (PNG); --generate."),
}


_SAE_HELP = {
    "site": "site(s) to read, e.g. blocks.6.resid_post (comma-separated: one SAE per site and size)",
    "corpus": "a folder of .txt files (searched recursively) or one .txt file",
    "activations": "train from this activation cache (featopt sae cache) instead of running the model",
    "architecture": "relu (L1 penalty) or topk (k largest kept); jumprelu SAEs load but do not train",
    "expansion": "d_sae / d_in; a list such as 1,2,4,8 trains one SAE per size from one pass",
    "d_sae": "number of latents instead of --expansion (a list trains several)",
    "k": "topk: latents kept per token",
    "l1": "relu: sparsity coefficient, relative to the batch's variance",
    "tokens": "training budget in tokens",
    "context_length": "tokens per context",
    "batch_size": "tokens per optimizer step (the global batch, whatever --devices)",
    "buffer_batches": "batches drawn from one shuffled buffer of contexts",
    "lr": "Adam learning rate (default 2e-4 / sqrt(d_sae / 2^14), per SAE)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "decay_fraction": "linear decay to 0 over this last fraction of the steps",
    "normalize": "scale inputs to mean squared norm d_in (folded into the saved weights)",
    "auxk_alpha": "topk: weight of the AuxK loss on dead latents (0: off)",
    "dead_tokens": "a latent that has not fired for this many tokens is dead",
    "skip_first": "leading positions of every context left out (position 0: an attention sink)",
    "eval_fraction": "the last fraction of every document, held out from training",
    "eval_contexts": "held-out contexts evaluated at the end (0: none)",
    "eval_every": "also evaluate on them every N steps, to TensorBoard (0: at the end only)",
    "dtype": "the model's dtype: float32, bfloat16, float16, float64",
    "sae": "SAE folder(s) to evaluate, comma-separated (SAELens, sparsify or Gemma Scope)",
    "split": "eval (the held-out text), train or all",
    "contexts": "contexts to evaluate",
    "batch_contexts": "contexts per forward",
    "max_tokens": "cache at most this many tokens",
    "out": "output folder (default featopt-runs/<time>)",
}

_SAE = {
    "train": ("featopt.commands.sae_train", "TrainConfig", "run_train", "format_train",
              "Train SAEs (relu or topk; several sizes or sites from one pass of the model) in SAELens' format."),
    "cache": ("featopt.commands.sae_train", "CacheConfig", "run_cache", "format_cache",
              "Save a corpus' activations at a site as safetensors shards, to train from with --activations."),
    "eval": ("featopt.commands.sae_train", "EvalConfig", "run_eval", "format_eval",
             "FVU, L0, dead fraction and CE loss recovered of SAEs on held-out text; writes metrics.json."),
    "features": ("featopt.commands.sae_read", "FeaturesConfig", "run_features", "format_features",
                 "Every latent's top and uniform (binned) examples, frequency and histogram over a corpus, in one pass."),
    "lens": ("featopt.commands.sae_read", "LensConfig", "run_lens", "format_lens",
             "Logit lens: decoder directions through the unembedding, high-norm tokens removed."),
    "ablate": ("featopt.commands.sae_read", "AblateConfig", "run_ablate", "format_ablate",
               "Ablated text (drop each earlier token) and direction ablation (next-token log-probs) for one latent."),
    "mcs": ("featopt.commands.sae_read", "MCSConfig", "run_mcs", "format_mcs",
            "Max cosine similarity of each latent with the decoder rows of other dictionaries (1x/2x/4x/8x)."),
    "dashboard": ("featopt.commands.sae_dashboard", "DashboardConfig", "run_dashboard", "format_dashboard",
                  "A static site (file://) per latent: examples, histogram, logit lens, ablations, maximizing inputs."),
}

# Flags whose meaning differs from the training commands'.
_SAE_TASK_HELP = {
    "features": {"tokens": "corpus tokens to read (at most)", "split": "all, train or eval (the text sae train held out)",
                 "sae": "the SAE folder", "top_k": "top activating examples kept per latent",
                 "n_bins": "equal-width activation bins, one uniform example sampled in each",
                 "window_before": "tokens kept before each example", "window_after": "tokens kept after each example",
                 "seed": "seed of the uniform examples", "out": "output folder for features.safetensors and features.json"},
    "lens": {"features": "latents, e.g. \"[:, :, 0-9]\" or 3,17", "k": "top and bottom tokens",
             "norm": "none (raw LM head), weight (the final norm's gain) or apply (the final norm module)",
             "drop_z": "drop tokens whose unembedding-row norm has a z-score above this", "drop_top": "or drop the n largest-norm tokens",
             "sae": "the SAE folder"},
    "ablate": {"latent": "the latent", "text": "the context",
               "position": "the target token, 0-based in the model input (with --bos, 0 is its BOS token; "
                           "default: where the latent is largest)",
               "mode": "contribution (x - z_i W_dec[i]) or projection (remove the direction)",
               "top": "tokens whose log-prob changed most", "sae": "the SAE folder"},
    "mcs": {"sae": "two or more SAE folders at one site, comma-separated", "threshold": "count latents with MCS at least this",
            "bins": "histogram bins over [0, 1]"},
    "dashboard": {"features": "latents to show, e.g. \"[:, :, 0-49]\"", "stats": "a featopt sae features folder to reuse",
                  "tokens": "corpus tokens for the statistics", "sae": "the SAE folder",
                  "ablate_examples": "top examples that get ablated text and direction ablation",
                  "search_top": "best single tokens from the exhaustive sweep (0: none)",
                  "ascent_steps": "gradient-ascent steps for the optimized input (0: none)",
                  "ascent_prior": "simplex (softmax over the vocabulary) or embedding (free embeddings)",
                  "ascent_lr": "learning rate of the optimized input",
                  "prefix": "text before the exhaustive sweep's token (default: the end-of-text token; none with "
                            "--bos, whose BOS token comes first)",
                  "out": "the dashboard folder (new, or an old dashboard to replace)"},
}


_FLOW = {
    "match": ("featopt.commands.flow_match", "MatchConfig", "run_match", "format_match",
              "Every feature's top-k matches by decoder cosine in its predecessor SAEs, against a baseline."),
    "graph": ("featopt.commands.flow_match", "GraphConfig", "run_graph", "format_graph",
              "A feature's flow graph: matches followed backwards and forwards through all SAEs (JSON, GraphML, PNG)."),
    "groups": ("featopt.commands.flow_corpus", "GroupsConfig", "run_groups", "format_groups",
               "Predecessor groups (From RES/MLP/ATT, ..., nowhere) over a corpus: shares per layer, transitions."),
    "deactivate": ("featopt.commands.flow_corpus", "DeactivateConfig", "run_deactivate", "format_deactivate",
                   "Deactivate top-1 vs random predecessors and measure the feature; sweep r against the loss."),
    "steer": ("featopt.commands.flow_steer", "SteerConfig", "run_steer", "format_steer",
              "Single-layer vs multi-layer (flow graph) steering during generation: theme score against coherence."),
    "transition": ("featopt.commands.flow_corpus", "TransitionConfig", "run_transition", "format_transition",
                   "Explained variance of layer L+1's latents from layer L's via the top-1 cosine transition matrix."),
}

_FLOW_HELP = {
    "saes": "SAE folders, comma-separated, or a folder holding them (one SAE per site)",
    "target": "SAEs to match, as LAYER/MODULE, comma-separated (e.g. 6/res)",
    "candidates": "SAEs to match against (default: each target's predecessors L-1/res, L/mlp, L/att)",
    "k": "matches kept per feature", "threshold": "count matches scoring at least this",
    "baseline": "none, random (Gaussian rows) or permutation (the candidate's coordinates shuffled)",
    "chunk": "target rows per block (memory: chunk x d_sae cosines)",
    "plot": "write a PNG", "out": "output folder (default featopt-runs/<time>)",
    "feature": "start feature(s) as LAYER/MODULE/INDEX, e.g. 6/res/123 (comma-separated)",
    "direction": "backward (where it comes from), forward (where it goes) or both",
    "model": "the model (labels nodes by logit-lens tokens; steering, groups and deactivation run it)",
    "label_k": "logit-lens tokens per node label", "norm": "logit lens: none, weight (final norm's gain) or apply",
    "max_nodes": "stop with an error when the graph grows past this",
    "corpus": "a folder of .txt files or one .txt file", "split": "all, train or eval (the text sae train held out)",
    "tokens": "corpus tokens to read (at most); steer: new tokens per generation",
    "context_length": "tokens per context", "batch_size": "contexts per forward",
    "layers": "layers, comma-separated (groups/deactivate: target layers L of L/res; steer: graph layers kept)",
    "method": "top1 (document 003) or random (a random predecessor per feature: the baseline)",
    "min_score": "a predecessor matched below this cosine counts as absent",
    "skip_first": "leading positions of each context left out (position 0: the attention sink)",
    "events": "active (feature, position) events sampled", "r": "rescaling coefficient of the deactivation (0: remove)",
    "rs": "r values, comma-separated (deactivate: sweep over all predecessors; steer: settings)",
    "graph": "a flow graph folder or graph.json: its features are the multi-layer set (default: built from --feature)",
    "targets": "features whose activation is the theme score (default: --feature)",
    "prompts": "prompts to continue (a list)", "mode": "add (x + r a_max W_dec[i]) or scale (each feature's share times r)",
    "theme_words": "words whose log-prob is scored too, comma-separated", "temperature": "0: greedy",
    "corpus_tokens": "add mode: corpus tokens for the reference (max) activations",
    "progress": "show progress", "dtype": "float32, bfloat16 or float16", "seed": "seed",
}


def _run_task(table: dict, task: str, args) -> None:
    import importlib

    module_name, config_name, run_name, format_name, _ = table[task]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    result = getattr(module, run_name)(config_cls(**{f.name: args[f.name] for f in fields(config_cls)}))
    print(getattr(module, format_name)(result))
    if getattr(result, "out", None):
        print(f"results: {result.out}")


def _config_parser(module: str, config_name: str, description: str, helps: dict | None = None) -> ArgumentParser:
    import importlib

    parser = _Parser(description=description)
    _add_config_arguments(parser, getattr(importlib.import_module(module), config_name), helps)
    return parser


_SEARCHES = {
    "exhaustive": ("featopt.discrete.exhaustive", "ExhaustiveConfig",
                   "Every vocabulary token as a one-token input (after an optional prefix); every feature scored in one sweep."),
    "greedy": ("featopt.discrete.greedy", "GreedyConfig",
               "Left-to-right greedy search: each step appends the token that maximizes the feature."),
    "gcg": ("featopt.discrete.gcg", "GCGConfig",
            "GCG: token gradients propose swaps, a batch of swaps is scored exactly, the best is kept (N tokens)."),
    "epo": ("featopt.discrete.epo", "EPOConfig",
            "EPO fluent search: one member per lambda, activation - lambda * xent, a Pareto front per feature (JSON, PNG)."),
}


def _run_config(module_name: str, config_name: str, args) -> None:
    """Build a method's config from the parsed flags, run it, print its table."""
    import importlib

    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    result = module.run(config_cls(**{f.name: args[f.name] for f in fields(config_cls)}))
    if getattr(result, "results", None) is not None and hasattr(module, "format_table") and module_name != "featopt.commands.compare":
        print(module.format_table(result.results))
    else:
        print(module.format_table(result))
    print(f"results: {result.out}")


_ALIGN_HELP = {
    "layer": "layers to compare, at least two: 0-29 or 0,4,8 (default: every layer; with --from, every layer in the files)",
    "site": "one kind: resid_post (default), resid_pre, attn_out, mlp_out, mlp_hidden (with --from: the files' only kind)",
    "features": 'problems, the same at every layer (default: every feature of the site, "[:, :, 0-(width-1)]")',
    "top_k": "size of each feature's top-k token set",
    "isolated": "each block alone on the token's embedding (one sweep per layer)",
    "seed": "random seed (untrained weights, and the baseline's feature permutation)",
    "dtype": "the model's dtype: float32, float64, bfloat16, float16",
    "device": "auto (cuda when there is one), cpu, cuda",
    "batch_size": "candidates per forward (0: automatic, halved on out-of-memory)",
    "from_": "exhaustive results.json files (or folders), comma-separated: align them instead of sweeping "
             "(the model flags are then unused)",
}

_INVERT_HELP = {
    "text": "a text to invert; repeat --text for more (each is one problem)",
    "texts": "texts to invert, as a list (YAML or JSON)",
    "objective": "l1: ||O(e_n) - O(e)||_1 (the documents'), or cosine: 1 - cos of the flattened outputs",
    "prior": "embedding (free input embeddings) or simplex (softmax over the vocabulary)",
    "decoder": "pinv or nearest (cosine); a simplex decodes by its own argmax",
    "temperature": "simplex softmax temperature at the start",
    "temperature_end": "simplex temperature at the end (default: constant)",
    "simplex_mode": "softmax (free logits) or projected (the documents' softmax after every step)",
}


def _invert_parser() -> ArgumentParser:
    from featopt.gradient.inversion import InversionConfig

    # "resolve": --text is redefined below to append, so that it can be repeated.
    invert = _Parser(description="Output-matching inversion: learn inputs whose outputs at a site match "
                     "those of the given texts, decode them and count the recovered tokens.", conflict_handler="resolve")
    _add_config_arguments(invert, InversionConfig)
    invert.add_argument("--text", action="append", default=None, help=_INVERT_HELP["text"])
    for action in invert._actions:
        if action.dest in _INVERT_HELP:
            action.help = _INVERT_HELP[action.dest]
    return invert


def _optimize(args) -> None:
    from featopt.gradient.ascent import AscentConfig, format_results, run

    config = AscentConfig(**{f.name: args[f.name] for f in fields(AscentConfig)})
    result = run(config)
    if result.trainer.is_global_zero:
        print(format_results(result.results))
        print(f"results: {result.out / 'results.json'}")


def _invert(args) -> None:
    from featopt.gradient.inversion import InversionConfig, format_results, run

    values = {f.name: args[f.name] for f in fields(InversionConfig)}
    if isinstance(values["text"], list):  # repeated --text (or a YAML list): all go to texts
        values["texts"] = values["text"] + list(values["texts"] or [])
        values["text"] = None
    result = run(InversionConfig(**values))
    if result.trainer is None or result.trainer.is_global_zero:
        print(format_results(result.results, result.metrics))
        print(f"results: {result.out / 'results.json'}")


def _quiet_lightning() -> None:
    # Lightning's start-up notices (GPU/TPU availability, tips) would bury the results table.
    # Its loggers get their level when it is imported, so import it first.
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # "Token indices sequence length is longer than ...": featopt checks input lengths against the
    # model itself and answers a too-long text with its own one sentence.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def _leaf(args) -> tuple[str, object, type | None]:
    """The chosen (sub)subcommand of parsed `args`: its name ("search gcg"), its namespace and its
    config dataclass (None for demo)."""
    import importlib

    command = args.command
    tables = {"search": (_SEARCHES, "kind"), "neurons": (_NEURONS, "task"), "sae": (_SAE, "task"), "flow": (_FLOW, "task")}
    if command not in tables:
        configs = {"optimize": ("featopt.gradient.ascent", "AscentConfig"), "compare": ("featopt.commands.compare", "CompareConfig"),
                   "invert": ("featopt.gradient.inversion", "InversionConfig"), "align": ("featopt.discrete.align", "AlignConfig")}
        config = configs.get(command)
        return command, args[command], config and getattr(importlib.import_module(config[0]), config[1])
    table, key = tables[command]
    name = args[command][key]
    return f"{command} {name}", args[command][name], getattr(importlib.import_module(table[name][0]), table[name][1])


def _check_flags(namespace, config_cls) -> None:
    """What every command requires of its flags: finite numbers (nan and inf are no setting of any
    float flag) and an `--out` featopt may write into (`featopt.runs.outdir`)."""
    import math

    from featopt.runs.outdir import check_out

    for f in fields(config_cls) if config_cls else ():
        value = namespace[f.name]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise FeatoptError(f"--{f.name} must be a finite number, got {v}.")
    check_out(namespace["out"] if "out" in namespace else None)


def main(argv: list[str] | None = None) -> int:
    from featopt.interrupt import Interrupted, raising_on_signals

    try:
        with raising_on_signals():
            return _main(argv)
    except Interrupted as interrupted:  # Ctrl-C or kill -TERM: every writer has cleaned up on the way here
        hint = interrupted.hint or "run it again"
        print(f"featopt: interrupted by {interrupted.name}; {hint}.", file=sys.stderr)
        return interrupted.exit_status


def _main(argv: list[str] | None) -> int:
    _quiet_lightning()
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with one message on malformed flags
    try:
        _check_flags(*_leaf(args)[1:])
        if args.command == "optimize":
            _optimize(args.optimize)
        elif args.command == "demo":
            from featopt.commands.demo import demo

            demo(out=args.demo.out, steps=args.demo.steps)
        elif args.command == "invert":
            _invert(args.invert)
        elif args.command == "search":
            module, config_name, _ = _SEARCHES[args.search.kind]
            _run_config(module, config_name, args.search[args.search.kind])
        elif args.command == "neurons":
            _run_task(_NEURONS, args.neurons.task, args.neurons[args.neurons.task])
        elif args.command == "sae":
            _run_task(_SAE, args.sae.task, args.sae[args.sae.task])
        elif args.command == "flow":
            _run_task(_FLOW, args.flow.task, args.flow[args.flow.task])
        elif args.command == "compare":
            _run_config("featopt.commands.compare", "CompareConfig", args.compare)
        elif args.command == "align":
            _run_config("featopt.discrete.align", "AlignConfig", args.align)
    except FeatoptError as error:  # one line, however the message was built
        print(f"featopt: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
