"""Bad input, as a new user types it, for every subcommand, each case in its own real process.

Every case must end with exit status 2, stderr exactly one line `featopt: error: ...` naming the
offending flag or value, no traceback, and nothing written (`--out` absent or unchanged).

To extend: add `(argv, words)` rows to the subcommand's list in ROWS (`{name}` in an argument is
one of the files of `files`; `--out` is added unless the row gives one). The generic kinds
(unknown flags, malformed values of every flag kind, nan/inf for every float flag, recipes that
are not recipes, `--out` folders that are not featopt's) are generated for every subcommand from
its parser. `test_every_subcommand_has_rows` fails for a subcommand without hand-written rows.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch
from cli_runner import CliServer, run_process
from hypothesis import given, settings
from hypothesis import strategies as st

from featopt.cli import build_parser

GPT2 = ["--model", "tiny-gpt2", "--no_progress"]
LLAMA = ["--model", "tiny-llama", "--no_progress"]
LONG = "the sea " * 60  # 120+ tokens: beyond the tiny models' 64 positions
CTX = ["--context_length", "16"]
CLAMP = ["--model", "tiny-llama", "--layer", "1"]  # clamp has no --progress
FEW = ["--features", "[:, :, 0-3]"]  # the SAEs here have 32 latents

ROWS: dict[str, list[tuple[list[str], str]]] = {
    "optimize": [
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--objective", "l2"], "allowed are l1, maximize"),
        (GPT2 + ["--layer", "-1"], "layer"),
        (GPT2 + ["--site", "blocks.1.nowhere"], "nowhere"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--features", "[:, 5, 0]", "--tokens", "3"], "position index 5"),
        (GPT2 + ["--features", ""], "feature spec"),
        (GPT2 + ["--features", "[:, :, -3]"], "-3"),
        (GPT2 + ["--tokens", "0"], "--tokens"),
        (GPT2 + ["--tokens", "65"], "--tokens"),
        (GPT2 + ["--tokens", "100000"], "--tokens"),
        (GPT2 + ["--steps", "-1"], "--steps"),
        (GPT2 + ["--lr", "0"], "--lr"),
        (GPT2 + ["--devices", "0"], "--devices"),
        (GPT2 + ["--checkpoint_every", "-1"], "--checkpoint_every"),
        (GPT2 + ["--prior", "simplex", "--temperature", "0"], "--temperature"),
        (GPT2 + ["--prior", "simplex", "--temperature_end", "-1"], "--temperature_end"),
        (GPT2 + ["--init", "   "], "--init"),
        (GPT2 + ["--init", LONG, "--tokens", "3"], "--init"),
        (["--model", "{text}"], "{text}"),
        (["--model", "{gguf}"], "{gguf}"),
        (["--model", "{badconfig}"], "config.json"),
        (["--model", "{badweights}"], "{badweights}"),
        (GPT2 + ["--sae", "{text}"], "{text}"),
        (GPT2 + ["--sae", "{truncsae}"], "sae_weights.safetensors"),
        (GPT2 + ["--resume", "{text}"], "--resume"),
    ],
    "demo": [
        (["--steps", "0"], "--steps"),
        (["--steps", "-5"], "--steps"),
    ],
    "invert": [
        (GPT2 + ["--text", "   "], "text 1"),
        (GPT2 + ["--text", "\n\t"], "text 1"),
        (GPT2 + ["--texts", '["ok", " "]'], "text 2"),
        (GPT2 + ["--text", LONG], "182 tokens"),
        (GPT2 + ["--text", "the sea", "--layer", "5"], "layer"),
        (GPT2 + ["--text", "the sea", "--site", "nowhere"], "nowhere"),
        (GPT2 + ["--text", "the sea", "--lr", "0"], "--lr"),
        (GPT2 + ["--text", "the sea", "--steps", "0"], "--steps"),
        (GPT2 + ["--text", "the sea", "--prior", "simplex", "--temperature", "0"], "--temperature"),
        (GPT2 + ["--text", "the sea", "--model", "{badconfig}"], "config.json"),
        (GPT2 + ["--text", "the sea", "--resume", "{text}"], "--resume"),
        (GPT2 + ["--text", "the sea", "--objective", "l2"], "allowed are l1, cosine"),
    ],
    "search exhaustive": [
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--layer", "0,7"], "layer"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--features", "[:, 1, 0]"], "position"),
        (GPT2 + ["--site", "mlp_hidden", "--features", "[:, :, 256]"], "256"),
        (GPT2 + ["--top_k", "0"], "--top_k"),
        (GPT2 + ["--prefix", LONG], "prefix"),
        (GPT2 + ["--candidates", "100000"], "token id 100000"),
        (GPT2 + ["--batch_size", "-1"], "--batch_size"),
        (GPT2 + ["--devices", "0"], "--devices"),
        (GPT2 + ["--dtype", "float8"], "--dtype"),
        (GPT2 + ["--device", "tpu"], "--device"),
        (GPT2 + ["--device_map", "everywhere"], "--device_map 'everywhere'"),
        (GPT2 + ["--device_map", '{{"transformer.h.0": 7}}'], "--device_map names cuda:7, but this machine has"),
        (GPT2 + ["--device_map", "{file}"], "is not JSON"),
        (GPT2 + ["--device_map", "auto", "--max_memory", '{{"cpu": "lots"}}'], "--max_memory gives 'cpu' the size 'lots'"),
        (GPT2 + ["--device_map", "auto", "--max_memory", "60GiB"], "--max_memory '60GiB' is not JSON"),
        (GPT2 + ["--max_memory", '{{"cpu": "1GiB"}}'], "--max_memory only applies with --device_map"),
        (["--model", "{gguf}"], "{gguf}"),
        (GPT2 + ["--objective", "l2"], "allowed are l1, maximize"),
        (GPT2 + ["--objective", "maximize(site='blocks.9.resid_post')"], "layer 9"),
        (GPT2 + ["--objective", "maximize + 0.1 * embedding_norm"], "embedding_norm"),
    ],
    "search greedy": [
        (GPT2 + ["--layer", "0", "--features", "[:,:,0]", "--tokens", "100000"], "--tokens"),
        (GPT2 + ["--tokens", "0"], "--tokens"),
        (GPT2 + ["--tokens", "65"], "--tokens"),
        (GPT2 + ["--prefix", "the sea", "--tokens", "62"], "--tokens"),
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--features", "[:, 9, 0]", "--tokens", "2"], "position"),
        (GPT2 + ["--top_k", "0"], "--top_k"),
        (GPT2 + ["--batch_size", "-1"], "--batch_size"),
        (GPT2 + ["--objective", "maximize("], "malformed"),
    ],
    "search gcg": [  # more in tests/test_cli_gcg.py
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--max_evaluations", "-1"], "--max_evaluations"),
        (GPT2 + ["--prefix", LONG], "182-token prefix"),
        (GPT2 + ["--objective", "maximize(features='[:, :, 64]')"], "64"),
    ],
    "search epo": [
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--lambdas", "[nan]"], "lambdas"),  # jsonargparse refuses it itself
        (GPT2 + ["--likely", "-3"], "--likely"),
        (GPT2 + ["--objective", "maximize * maximize"], "a product needs a number"),
    ],
    "compare": [
        (GPT2 + ["--layer", "3"], "layer"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--methods", '["bogus"]'], "bogus"),
        (GPT2 + ["--methods", "[]"], "--methods"),
        (GPT2 + ["--steps", "0"], "--steps"),
        (GPT2 + ["--lr", "-1"], "--lr"),
        (GPT2 + ["--gcg_width", "0"], "--gcg_width"),
        (GPT2 + ["--top_k", "0"], "--top_k"),
        (GPT2 + ["--temperature", "0"], "--temperature"),
        (GPT2 + ["--objective", "logit(token='the sea')"], "give one token"),
    ],
    "neurons decode": [
        (GPT2 + ["--layers", "5"], "layer"),
        (GPT2 + ["--layers", "x"], "'x' is malformed"),
        (GPT2 + ["--top_k", "0"], "--top_k"),
        (GPT2 + ["--which", "sideways"], "--which"),
        (GPT2 + ["--norm", "x"], "--norm"),
        (GPT2 + ["--row_chunk", "0"], "--row_chunk"),
        (GPT2 + ["--vocab_chunk", "0"], "--vocab_chunk"),
        (GPT2 + ["--device_map", '{{"transformer": "gpu"}}'], "which is not a device"),
        (GPT2 + ["--device_map", "auto", "--max_memory", '{{"tpu": "1GiB"}}'], "--max_memory names device 'tpu'"),
        (["--model", "{badconfig}"], "config.json"),
    ],
    "neurons find": [
        (GPT2 + ["--token", ""], "--token"),
        (GPT2 + ["--token_id", "100000"], "--token_id"),
        (GPT2 + ["--token_id", "-1"], "--token_id"),
        (GPT2 + ["--token", " the", "--layers", "9"], "layer"),
        (GPT2 + ["--token", " the", "--top", "0"], "--top"),
    ],
    "neurons compare": [
        (GPT2 + ["--model_b", "{badconfig}"], "config.json"),
        (GPT2 + ["--model_b", "tiny-llama"], "tiny-llama"),
        (GPT2 + ["--layers", "9"], "layer"),
    ],
    "neurons clamp": [
        (CLAMP + ["--neuron", "100000", "--prompt", "the sea", "--target", " the"], "neuron 100000"),
        (CLAMP + ["--neuron", "-1", "--prompt", "the sea", "--target", " the"], "neuron -1"),
        (CLAMP + ["--neuron", "3", "--prompt", "", "--target", " the"], "--prompt"),
        (CLAMP + ["--neuron", "3", "--prompt", "  ", "--target", " the"], "--prompt"),
        (CLAMP + ["--neuron", "3", "--prompt", LONG, "--target", " the"], "--prompt"),
        (CLAMP + ["--neuron", "3", "--prompt", "the sea", "--target", ""], "--target"),
        (CLAMP + ["--neuron", "3", "--prompt", "the sea", "--target", " the", "--values", "a:b:c"], "--values"),
        (CLAMP + ["--neuron", "3", "--prompt", "the sea", "--target", " the", "--values", "0:1:0"], "--values"),
        (CLAMP + ["--neuron", "3", "--prompt", "the sea", "--target", " the", "--values", "nan:1:3"], "--values"),
        (CLAMP + ["--neuron", "3", "--prompt", "the sea", "--target", " the", "--generate", "-1"], "--generate"),
    ],
    "sae train": [
        (LLAMA + ["--corpus", "{corpus}", "--context_length", "65"], "--context_length"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--tokens", "0"], "--tokens"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--site", "blocks.1.nowhere"], "nowhere"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--eval_fraction", "1.5"], "--eval_fraction"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--decay_fraction", "2"], "--decay_fraction"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--batch_size", "0"], "--batch_size"),
        (LLAMA + CTX + ["--activations", "{text}"], "{text}"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--resume", "{text}"], "--resume"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--optimizer", "sgd"], "--optimizer 'sgd' is not known: allowed are adam, signum"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--devices", "2", "--distribute_modules"], "--distribute_modules"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--devices", "2", "--distribute_modules", "--strategy", "fsdp"],
         "--strategy fsdp"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--num_nodes", "0"], "--num_nodes"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--sae_device", "tpu"], "--sae_device 'tpu' is not a device"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--sae_device", "cuda:7"], "--sae_device cuda:7"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--sae_device", "cpu", "--devices", "2"], "--sae_device cpu places"),
    ],
    "sae cache": [
        (LLAMA + CTX + ["--corpus", "{corpus}", "--site", "blocks.7.resid_post"], "out of range"),
        (LLAMA + ["--corpus", "{corpus}", "--context_length", "0"], "--context_length"),
        (LLAMA + ["--corpus", "{corpus}", "--context_length", "65"], "--context_length"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--eval_fraction", "-0.5"], "--eval_fraction"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--split", "x"], "--split"),
        (LLAMA + CTX + ["--corpus", "{corpus}", "--max_tokens", "0"], "--max_tokens"),
        (LLAMA + ["--bos", "--corpus", "{corpus}", "--context_length", "65"], "BOS token of --bos"),
        (LLAMA + CTX + ["--corpus", "{missing}"], "does not exist"),
    ],
    "sae eval": [
        (LLAMA + CTX + ["--sae", "{text}", "--corpus", "{corpus}"], "{text}"),
        (LLAMA + CTX + ["--sae", "{truncsae}", "--corpus", "{corpus}"], "sae_weights.safetensors"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--contexts", "0"], "--contexts"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--split", "x"], "--split"),
    ],
    "sae features": [
        (LLAMA + CTX + ["--sae", "{text}", "--corpus", "{corpus}"], "{text}"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--n_bins", "0"], "--n_bins"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--window_before", "-1"], "--window_before"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--tokens", "0"], "--tokens"),
    ],
    "sae lens": [
        (["--model", "tiny-llama", "--sae", "{truncsae}"], "sae_weights.safetensors"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--k", "0"], "--k"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--drop_top", "-1"], "--drop_top"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--features", "[:, :, -1]"], "-1"),
    ],
    "sae ablate": [
        (["--model", "tiny-llama", "--sae", "{sae}", "--text", ""], "--text"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--text", LONG], "--text"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--text", "The cat", "--latent", "-1"], "--latent"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--text", "The cat", "--position", "-1"], "--position"),
        (["--model", "tiny-llama", "--sae", "{sae}", "--text", "The cat", "--top", "0"], "--top"),
        (["--model", "tiny-llama", "--bos", "--sae", "{sae}", "--text", "The", "--position", "1"], "1 token"),
        (["--model", "tiny-llama", "--bos", "--sae", "{sae}", "--text", "The cat", "--position", "1"], "--position"),
    ],
    "sae mcs": [
        (["--sae", "{text},{text}"], "{text}"),
        (["--sae", "{sae},{sae}", "--bins", "0"], "--bins"),
        (["--sae", "{sae},{sae}", "--threshold", "-0.5"], "--threshold"),
    ],
    "sae dashboard": [
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--stats", "{text}"], "{text}"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--input_lambdas", "[0, .nan]"], "--input_lambdas"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--input_lambdas", "[0, 0]"], "--input_lambdas"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--features", "[:, :, -1]"], "-1"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--input_tokens", "100"], "--input_tokens 100"),
        (LLAMA + CTX + FEW + ["--bos", "--sae", "{sae}", "--corpus", "{corpus}", "--input_tokens", "64"], "prefix"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--input_tokens", "0"], "--input_tokens"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--input_likely", "-1"], "--input_likely"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--inputs", "{text}"], "sae inputs"),
    ],
    "sae inputs": [
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--features", "[:, :, 32]"], "32"),
        (LLAMA + CTX + ["--sae", "{sae}", "--corpus", "{corpus}", "--features", "[:, :, -1]"], "-1"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--prefix", LONG], "--tokens"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--tokens", "0"], "--tokens"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--tokens", "-2"], "--tokens"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--tokens", "64"], "--tokens"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--lambdas", "[0, .inf]"], "--lambdas"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--lambdas", "[.nan]"], "--lambdas"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--lambdas", "[0, -1]"], "--lambdas"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--budget", "[1, 1]"], "--budget"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--lambdas", "[]", "--budget", "[]"], "both empty"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--steps", "-1"], "--steps"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--search_width", "0"], "--search_width"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--likely", "-5"], "--likely"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--sample", "2"], "--stats"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--corpus", "{corpus}", "--init", "a b c"], "--init"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}"], "--corpus"),
        (LLAMA + CTX + FEW + ["--sae", "{sae}", "--stats", "{text}"], "{text}"),
        (LLAMA + CTX + FEW + ["--corpus", "{corpus}", "--objective", "maximize(site='blocks.1.nowhere')"], "nowhere"),
    ],
    "flow match": [
        (["--saes", "{text}"], "{text}"),
        (["--saes", "{truncsae}"], "sae_weights.safetensors"),
        (["--saes", "{saes}", "--chunk", "0"], "--chunk"),
    ],
    "flow graph": [
        (["--saes", "{saes}", "--feature", "9/res/0"], "9/res"),
        (["--saes", "{saes}", "--feature", "1/res/0", "--max_nodes", "0"], "--max_nodes"),
        (["--saes", "{saes}", "--feature", "1/res/0", "--label_k", "-1"], "--label_k"),
        (["--saes", "{saes}", "--feature", "1/res/0", "--model", "{badconfig}"], "config.json"),
    ],
    "flow groups": [
        (LLAMA + CTX + ["--saes", "{saes}", "--corpus", "{corpus}", "--batch_size", "0"], "--batch_size"),
        (LLAMA + CTX + ["--saes", "{saes}", "--corpus", "{corpus}", "--tokens", "0"], "--tokens"),
        (LLAMA + ["--saes", "{saes}", "--corpus", "{corpus}", "--context_length", "65"], "--context_length"),
    ],
    "flow deactivate": [
        (LLAMA + CTX + ["--saes", "{saes}", "--corpus", "{corpus}", "--tokens", "0"], "--tokens"),
        (LLAMA + CTX + ["--saes", "{saes}", "--corpus", "{corpus}", "--rs", "0,x"], "--rs"),
    ],
    "flow steer": [
        (LLAMA + ["--saes", "{saes}", "--feature", "1/res/3", "--prompts", "[]"], "--prompts"),
        (LLAMA + ["--saes", "{saes}", "--feature", "1/res/3", "--tokens", "0"], "--tokens"),
        (LLAMA + ["--saes", "{saes}", "--feature", "1/res/3", "--tokens", "100000"], "--tokens"),
        (LLAMA + ["--saes", "{saes}", "--feature", "1/res/3", "--graph", "{text}"], "{text}"),
        (LLAMA + ["--saes", "{saes}", "--feature", "1/res/3", "--temperature", "-1"], "--temperature"),
        # 1 + 63 positions fit the 64 of tiny-llama; the BOS token makes 65
        (LLAMA + ["--bos", "--saes", "{saes}", "--feature", "1/res/3", "--prompts", '["The"]', "--tokens", "63"], "--bos"),
    ],
    "flow transition": [
        (LLAMA + CTX + ["--saes", "{res0}", "--corpus", "{corpus}"], "two"),
        (LLAMA + CTX + ["--saes", "{saes}", "--corpus", "{corpus}", "--layers", "9"], "9"),
    ],
    "graph build": [
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", LONG], "the prompt"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--target", " the cat"], "--target"),
        (LLAMA + ["--transcoders", "{halftc}", "--prompt", "The cat"], "missing layer 2"),
        (LLAMA + ["--transcoders", "{saes}", "--prompt", "The cat"], "blocks.L.mlp_in to blocks.L.mlp_out"),
        (GPT2 + ["--transcoders", "{transcoders}", "--prompt", "The cat"], "Llama-like"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--node_threshold", "0"], "--node_threshold"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--edge_threshold", "1.5"], "--edge_threshold"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--desired_prob", "0"], "--desired_prob"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--max_logits", "0"], "--max_logits"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "  "], "--prompt"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--skip_first", "40"], "--skip_first 40"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--skip_first", "-1"], "--skip_first"),
        (LLAMA + ["--prompt", "The cat"], "--transcoders"),
        (LLAMA + ["--transcoders", "{missing}", "--prompt", "The cat"], "does not exist"),
        (LLAMA + ["--transcoders", "{transcoders}", "--prompt", "The cat", "--dashboards", "{text}"], "--dashboards"),
    ],
    "graph intervene": [
        (["--graph", "{text}"], "featopt graph build"),
        (["--graph", "{graph}"], "--features"),
        (["--graph", "{graph}", "--features", "x"], "node id"),
        (["--graph", "{graph}", "--features", "9_9_9"], "9_9_9"),
        (["--graph", "{graph}", "--features", "0_1_1", "--top", "2"], "--top"),
        (["--graph", "{graph}", "--top", "1", "--model", "tiny-gpt2"], "Llama-like"),
        (["--graph", "{graph}", "--top", "1", "--layers", "7"], "layer 7 is out of range"),
    ],
    "graph view": [
        (["--graph", "{text}"], "featopt graph build"),
        (["--graph", "{graph}", "--dashboards", "{text}"], "--dashboards"),
    ],
    "align": [
        (GPT2 + ["--layer", "0,7"], "layer"),
        (GPT2 + ["--layer", "1"], "layer"),
        (GPT2 + ["--features", "[:, :, 64]"], "64"),
        (GPT2 + ["--top_k", "0"], "--top_k"),
        (GPT2 + ["--from", "{text}"], "{text}"),
        (GPT2 + ["--layer", "0,1", "--objective", "l2"], "allowed are l1, maximize"),
    ],
}


# ----------------------------------------------------------------------------- the parser's flags
def leaf_parsers(parser=None, path=()):
    """Every (sub)subcommand of `featopt`: `(name, its parser)`, e.g. `("search gcg", ...)`."""
    parser = parser or build_parser()
    subs = [a for a in parser._actions if type(a).__name__ == "ActionSubCommands"]
    if not subs:
        yield " ".join(path), parser
        return
    for name, sub in subs[0]._name_parser_map.items():
        yield from leaf_parsers(sub, (*path, name))


def flags(parser) -> dict[str, object]:
    """`{--flag: its type hint}`; booleans (`--x/--no_x`) as `bool`."""
    found = {}
    for action in parser._actions:
        names = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no_")]
        if not names or action.dest in ("help", "config", "print_config"):
            continue
        if type(action).__name__ == "ActionYesNo":
            found[names[0]] = bool
        else:
            found[names[0]] = getattr(action, "_typehint", None) or action.type or str
    return found


def kinds(hint) -> set:
    """The plain types a hint admits: `int | None` -> {int, NoneType}."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, tuple):
        return {list}
    return set().union(*(kinds(a) for a in args)) if args else {hint}


def generic_rows(parser) -> list[tuple[list[str], str]]:
    """The generated bad input of one subcommand: unknown flag, recipes that are not recipes,
    malformed values of every flag kind, nan/inf for every float flag, `--out` not featopt's."""
    rows = [(["--no_such_flag", "1"], "no_such_flag"), (["--layr", "1"], "layr"),
            (["--config", "{text}"], "config"), (["--config", "{badyaml}"], "config")]
    for flag, hint in flags(parser).items():
        types = kinds(hint)
        if flag == "--out":
            rows += [([flag, "{file}"], "{file}"), ([flag, "{foreign}"], "{foreign}")]
        elif types & {int, float} and str not in types:
            rows.append(([flag, "x1"], flag[2:]))
        elif bool in types:
            rows.append(([f"{flag}=maybe"], flag[2:]))
        elif list in types:
            rows.append(([flag, "[1, "], flag[2:]))
        if float in types:
            rows += [([flag, v], flag[2:]) for v in ("nan", "inf", "-inf")]
    return rows


PARSER = build_parser()
LEAVES = dict(leaf_parsers(PARSER))
CASES = [(name, argv, words, "row") for name, rows in ROWS.items() if name in LEAVES for argv, words in rows]
CASES += [(name, argv, words, "generic") for name, parser in LEAVES.items() for argv, words in generic_rows(parser)]


def _id(case) -> str:
    name, argv, _, _ = case
    return f"{name}: {' '.join(a if len(a) < 24 else a[:20] + '...' for a in argv if a not in GPT2 + LLAMA + CTX)}"


# ----------------------------------------------------------------------------- files that lie
def _make_files(root: Path) -> dict[str, Path]:
    from featopt.models.sae.formats import save_sae
    from featopt.models.sae.model import SAEConfig, SparseAutoencoder

    files = {name: root / name for name in ("text", "badyaml", "gguf", "badconfig", "badweights", "corpus", "sae",
                                            "truncsae", "saes", "file", "foreign", "missing", "transcoders", "halftc",
                                            "graph")}
    files["text"] = root / "notes.txt"
    files["text"].write_text("hello, this is not what it claims to be\n")
    files["badyaml"] = root / "recipe.yaml"
    files["badyaml"].write_text("model: [tiny-gpt2\nlayer: : 1\n")
    files["gguf"] = root / "model.gguf"
    files["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00\x02\x00")  # a header cut short
    files["badconfig"].mkdir()
    (files["badconfig"] / "config.json").write_text("{not json")
    from transformers import GPT2Config, GPT2LMHeadModel

    files["badweights"].mkdir()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0)
                    ).save_pretrained(files["badweights"])
    weights = files["badweights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    files["corpus"].mkdir()
    (files["corpus"] / "a.txt").write_text("The cat sat on the mat. The dog ran to the park and back again. " * 20)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"))
    save_sae(sae, files["sae"])
    save_sae(sae, files["truncsae"])
    cut = files["truncsae"] / "sae_weights.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    for layer, kind in ((0, "resid_post"), (1, "resid_post"), (1, "mlp_out"), (1, "attn_out")):
        save_sae(SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4,
                                             hook_name=f"blocks.{layer}.hook_{kind}")), files["saes"] / f"{layer}-{kind}")
    files["res0"] = files["saes"] / "0-resid_post"
    from tests.attribution.tiny_graph import transcoder

    for layer in range(3):  # tiny-llama's three layers; the half set lacks layer 2
        save_sae(transcoder(layer, seed=layer), files["transcoders"] / f"layer{layer}")
        if layer < 2:
            save_sae(transcoder(layer, seed=layer), files["halftc"] / f"layer{layer}")
    from featopt.attribution.build import build_graph, load_transcoders
    from featopt.models import load_model

    build_graph(load_model("tiny-llama"), load_transcoders(files["transcoders"]), "The cat sat", files["graph"],
                transcoder_folder=str(files["transcoders"]))
    files["file"].write_text("a file")
    files["foreign"].mkdir()
    (files["foreign"] / "notes.txt").write_text("mine")
    return files


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _make_files(tmp_path_factory.mktemp("bad-input-files"))


@pytest.fixture(scope="module")
def cli():
    with CliServer() as server:
        yield server


@pytest.fixture(scope="module")
def outcomes(cli, files, tmp_path_factory):
    """Every case, run once in its own forked process (two at a time): `{case index: (argv, out,
    snapshot before, result)}`. Each case runs in its own empty folder, which is also its cwd."""
    root = tmp_path_factory.mktemp("bad-input-cases")
    prepared = []
    for i, (name, argv, words, _) in enumerate(CASES):
        cwd = root / f"case-{i}"
        cwd.mkdir()
        argv = [a.format(**files) for a in argv]
        if "--out" not in argv:
            argv += ["--out", str(cwd / "out")]
        out = Path(argv[argv.index("--out") + 1])
        prepared.append((i, [*name.split(), *argv], cwd, out))
    before = {i: _snapshot(out) for i, _, _, out in prepared}
    results = cli.run_many([(argv, cwd) for _, argv, cwd, _ in prepared], jobs=2, timeout=120)
    return {i: (argv, cwd, out, before[i], result) for (i, argv, cwd, out), result in zip(prepared, results)}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_bad_input_ends_in_one_line_exit_2_and_nothing_written(outcomes, files, index):
    name, _, words, _ = CASES[index]
    argv, cwd, out, before, result = outcomes[index]
    words = words.format(**files)
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything[-3000:]
    lines = result.stderr.strip().splitlines()
    assert result.status == 2, (result.status, everything[-3000:])
    assert len(lines) == 1 and lines[0].startswith("featopt: error:"), result.stderr
    assert words in lines[0], lines[0]
    assert _snapshot(out) == before, f"{out} changed"
    assert sorted(p.name for p in cwd.iterdir()) == [".stderr", ".stdout"], "a file was written into the cwd"


# ----------------------------------------------------------------------------- coverage of the table
def test_every_subcommand_has_rows():
    """A subcommand that `featopt --help` (or a group's --help) lists must have hand-written rows."""
    missing = sorted(set(LEAVES) - {name for name, rows in ROWS.items() if rows})
    assert not missing, f"add rows for {missing} to ROWS in {__file__}"
    help_text = run_process(["--help"]).stdout
    for name in LEAVES:
        assert name.split()[0] in help_text


def test_generators_cover_every_float_flag_with_nan_and_inf():
    # an independent walk of the config dataclasses: every float field must get nan, inf and -inf rows
    from dataclasses import fields

    from featopt.commands.optimize import AscentConfig

    hints = typing.get_type_hints(AscentConfig)
    floats = {f.name for f in fields(AscentConfig) if float in kinds(hints[f.name])}
    assert {"lr", "target", "temperature", "temperature_end"} <= floats
    rows = generic_rows(LEAVES["optimize"])
    for name in floats:
        assert {tuple(a) for a, _ in rows} >= {(f"--{name}", v) for v in ("nan", "inf", "-inf")}


# ----------------------------------------------------------------------------- the runner is a real process
SAME = [
    ["optimize", "--layer", "x"],
    ["search", "greedy", "--model", "tiny-gpt2", "--layer", "3"],
    ["invert", "--model", "tiny-gpt2", "--text", "  "],
    ["sae", "mcs", "--sae", "{text},{text}"],
    ["optimize", "--lr", "nan"],
]


def test_the_runner_reports_what_a_plain_process_reports(cli, files, tmp_path):
    for argv in SAME:
        argv = [a.format(**files) for a in argv] + ["--out", str(tmp_path / "out")]
        forked, plain = cli.run(argv, cwd=tmp_path), run_process(argv, cwd=tmp_path)
        assert (forked.status, forked.stderr) == (plain.status, plain.stderr)
        assert forked.status == 2


def test_a_good_run_in_the_runner_succeeds_and_writes_its_results(cli, tmp_path):
    # the runner must not turn every command into an error: a good command exits 0 and writes
    result = cli.run(["optimize", "--model", "tiny-gpt2", "--steps", "1", "--tokens", "1", "--no_progress",
                      "--out", str(tmp_path / "ok")], cwd=tmp_path)
    assert result.status == 0 and (tmp_path / "ok" / "results.json").exists(), result.stderr[-2000:]
    # and writing into the folder of that previous run is allowed (it is featopt's)
    again = cli.run(["optimize", "--model", "tiny-gpt2", "--steps", "1", "--tokens", "1", "--no_progress",
                     "--out", str(tmp_path / "ok")], cwd=tmp_path)
    assert again.status == 0, again.stderr[-2000:]


# ----------------------------------------------------------------------------- fuzzing the numeric flags
NUMERIC = [(name, flag) for name, parser in LEAVES.items() for flag, hint in flags(parser).items()
           if kinds(hint) & {int, float} and str not in kinds(hint)]
VALUES = st.one_of(st.floats().map(repr), st.floats().map(str), st.integers(-10**30, 10**30).map(str),
                   st.text(max_size=12), st.sampled_from(["nan", "-nan", "NaN", "inf", "+inf", "-Infinity", "1e999",
                                                          "0x10", "1_000", " 3 ", "", "-0", "1,2", "[1]", "null"]))


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(NUMERIC), value=VALUES)
def test_a_numeric_flag_is_accepted_or_refused_in_one_line(case, value):
    """Random strings and numbers through each subcommand's parser and featopt's flag checks (in
    this process: nothing runs past the checks): exit 2 with one line, or a finite value accepted."""
    import contextlib
    import io

    from featopt.cli import command_of, config_from
    from featopt.commands.fields import check_config
    from featopt.errors import FeatoptError

    name, flag = case
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = PARSER.parse_args([*name.split(), f"{flag}={value}"])
        command, namespace = command_of(args)
        check_config(config_from(command, namespace))
    except SystemExit as stop:
        assert stop.code == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("featopt: error:"), err.getvalue()
        return
    except FeatoptError as error:
        assert "\n" not in str(error) and flag in str(error)
        return
    parsed = namespace[flag[2:]]
    assert parsed is None or (isinstance(parsed, (int, float)) and math.isfinite(parsed)), (value, parsed)
