"""The command lines of the refactor-equivalence suite, in the order they run.

Every `featopt` subcommand (not `demo`, whose output is meant to change) on the built-in tiny
models, with an explicit seed and a small budget. `{corpus}` is the suite's corpus folder and
`{runs}` the folder holding every command's output; each command writes into `{runs}/<name>`
(the runner appends `--out`), so later commands read earlier ones' SAEs and statistics there.
The `name` is also the fixture's file stem: tests/equivalence/fixtures/<name>.json.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    argv: tuple[str, ...]


def _c(name: str, *argv: str) -> Command:
    return Command(name, tuple(argv))


NP = "--no_progress"
GPT2 = ("--model", "tiny-gpt2")
LLAMA = ("--model", "tiny-llama")
# sae train settings shared by every training run: 16-token contexts, 128-token batches, 20 steps.
TRAIN = ("--context_length", "16", "--batch_size", "128", "--tokens", "2560", "--buffer_batches", "2",
         "--warmup_steps", "2", "--eval_contexts", "4", "--seed", "0", NP)
FLOW_SITES = ",".join(["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post", "blocks.1.mlp_out",
                       "blocks.2.mlp_out", "blocks.1.attn_out", "blocks.2.attn_out"])
RELU = "{runs}/sae-train-relu/blocks.1.resid_post-relu"  # + "-32" or "-64": sae-train-relu's two sizes
SAE = "{runs}/sae-train-topk"  # a topk SAE of 32 latents at blocks.1.resid_post of tiny-llama
FLOW = ("--saes", "{runs}/sae-train-flow")
FLOW_CORPUS = ("--corpus", "{corpus}", "--tokens", "512", "--context_length", "16", "--seed", "0", NP)
OPTIMIZE = ("optimize", *GPT2, "--layer", "1", "--features", "[:, :, 0-2]", "--tokens", "3", "--steps", "20",
            "--seed", "1", NP)
EXHAUSTIVE = ("search", "exhaustive", "--layer", "0,1", "--features", "[:, :, 0-3]", "--top_k", "5", "--seed", "0", NP)
GCG = ("search", "gcg", *GPT2, "--layer", "1", "--features", "[:, :, 0-2]", "--tokens", "3", "--steps", "3",
       "--search_width", "16", "--topk", "16", "--seed", "0", NP)
INVERT = ("invert", *LLAMA, "--layer", "0", "--text", "the sea", "--text", "a small town by", "--seed", "0", NP)

COMMANDS: list[Command] = [
    # ---- gradient methods and discrete searches on the raw model
    _c("optimize", *OPTIMIZE),
    _c("optimize-simplex", *OPTIMIZE, "--prior", "simplex"),
    _c("optimize-bos", "optimize", *LLAMA, "--bos", "--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "3",
       "--steps", "20", "--seed", "2", NP),
    _c("invert", *INVERT, "--steps", "30", "--objective", "cosine"),
    _c("invert-gcg", *INVERT, "--method", "gcg", "--steps", "5"),
    _c("search-exhaustive", *EXHAUSTIVE, *GPT2),
    _c("search-exhaustive-bos", *EXHAUSTIVE, *LLAMA, "--bos"),
    _c("search-greedy", "search", "greedy", "--model", "tiny-neox", "--layer", "1", "--features", "[:, :, 3-4]",
       "--tokens", "2", "--variant", "both", "--top_k", "3", "--seed", "0", NP),
    _c("search-gcg", *GCG),
    _c("search-gcg-no-pool", *GCG, "--no_pool"),
    _c("search-epo", "search", "epo", *GPT2, "--layer", "1", "--features", "[:, :, 3]", "--tokens", "3",
       "--prefix", " the", "--steps", "3", "--search_width", "8", "--topk", "8", "--lambdas", "[0, 2]", "--seed", "0",
       NP),
    _c("compare", "compare", *GPT2, "--layer", "1", "--features", "[:, :, 0-1]", "--steps", "10", "--gcg_steps", "3",
       "--top_k", "5", "--seed", "0", NP),
    _c("align", "align", "--model", "tiny-neox", "--layer", "0-2", "--features", "[:, :, 0-7]", "--top_k", "5",
       "--seed", "0", NP),
    # ---- MLP neurons through the LM head, and clamped
    _c("neurons-decode", "neurons", "decode", *GPT2, "--layers", "0", "--top_k", "3", "--seed", "0", NP),
    _c("neurons-find", "neurons", "find", *LLAMA, "--token", " the", "--top", "5", "--top_k", "3", "--seed", "0", NP),
    _c("neurons-compare", "neurons", "compare", *LLAMA, "--untrained_b", "--seed_b", "1", "--seed", "0", NP),
    _c("neurons-clamp", "neurons", "clamp", *LLAMA, "--layer", "1", "--neuron", "3", "--prompt", "the sea",
       "--target", " the", "--values=-50:50:5", "--seed", "0"),
    _c("neurons-clamp-generate", "neurons", "clamp", *LLAMA, "--layer", "1", "--neuron", "3", "--prompt", "the sea",
       "--target", " the", "--values=-50:50:3", "--generate", "4", "--seed", "0"),
    # ---- sparse autoencoders: trained here, then read by every later command
    _c("sae-train-topk", "sae", "train", *LLAMA, "--optimizer", "adam", "--site", "blocks.1.resid_post", "--corpus", "{corpus}",
       "--architecture", "topk", "--d_sae", "32", "--k", "4", *TRAIN),
    _c("sae-train-relu", "sae", "train", *LLAMA, "--optimizer", "adam", "--site", "blocks.1.resid_post", "--corpus", "{corpus}",
       "--architecture", "relu", "--d_sae", "32,64", *TRAIN),
    _c("sae-cache", "sae", "cache", *LLAMA, "--site", "blocks.1.resid_post", "--corpus", "{corpus}",
       "--context_length", "16", NP),
    _c("sae-train-activations", "sae", "train", *LLAMA, "--optimizer", "adam", "--site", "blocks.1.resid_post",
       "--activations", "{runs}/sae-cache", "--architecture", "topk", "--d_sae", "32", "--k", "4", *TRAIN),
    _c("sae-train-flow", "sae", "train", *LLAMA, "--optimizer", "adam", "--site", FLOW_SITES, "--corpus", "{corpus}", "--architecture", "topk",
       "--d_sae", "32", "--k", "4", *TRAIN),
    _c("sae-eval", "sae", "eval", *LLAMA, "--sae", f"{SAE},{{runs}}/sae-train-activations", "--corpus", "{corpus}",
       "--context_length", "16", "--contexts", "4", NP),
    _c("sae-features", "sae", "features", *LLAMA, "--sae", SAE, "--corpus", "{corpus}", "--context_length", "16",
       "--tokens", "1024", "--top_k", "3", "--n_bins", "4", "--seed", "0", NP),
    _c("sae-lens", "sae", "lens", *LLAMA, "--sae", SAE, "--features", "0-2", "--k", "4"),
    _c("sae-ablate", "sae", "ablate", *LLAMA, "--sae", SAE, "--latent", "5",
       "--text", "The harbour was quiet in the early morning."),
    _c("sae-mcs", "sae", "mcs", "--sae", f"{RELU}-32,{RELU}-64"),
    _c("sae-dashboard", "sae", "dashboard", *LLAMA, "--sae", SAE, "--stats", "{runs}/sae-features",
       "--features", "[:, :, 0-2]", "--no_input_search", "--search_top", "5", "--ablate_examples", "1",
       "--seed", "0", NP),
    # ---- SAE latents as the features of the methods
    _c("search-exhaustive-sae", "search", "exhaustive", *LLAMA, "--sae", SAE, "--features", "[:, :, 0-3]",
       "--top_k", "5", "--seed", "0", NP),
    _c("search-gcg-sae", "search", "gcg", *LLAMA, "--sae", SAE, "--features", "[:, :, 0-1]", "--tokens", "3",
       "--steps", "3", "--search_width", "16", "--topk", "16", "--seed", "0", NP),
    # From text on which these latents fire (checked): a latent that is off has zero gradient.
    _c("optimize-sae", "optimize", *LLAMA, "--sae", SAE, "--features", "[:, :, [3, 11, 27]]", "--init", "the sea",
       "--tokens", "4", "--steps", "10", "--seed", "0", NP),
    # ---- feature flow across layers, on the seven SAEs of sae-train-flow
    _c("flow-match", "flow", "match", *FLOW, "--k", "2", "--threshold", "0.3", "--baseline", "permutation",
       "--seed", "0"),
    _c("flow-graph", "flow", "graph", *FLOW, "--feature", "2/res/3", "--threshold", "0.2", *LLAMA),
    _c("flow-groups", "flow", "groups", *LLAMA, *FLOW, *FLOW_CORPUS),
    _c("flow-transition", "flow", "transition", *LLAMA, *FLOW, *FLOW_CORPUS),
    _c("flow-deactivate", "flow", "deactivate", *LLAMA, *FLOW, *FLOW_CORPUS, "--events", "12", "--rs", "0,1"),
    _c("flow-steer", "flow", "steer", *LLAMA, *FLOW, "--feature", "2/res/3", "--threshold", "0.2", "--mode", "add",
       "--rs", "1,2", "--tokens", "6", "--prompts", '["The cat", "A dog"]', "--corpus", "{corpus}",
       "--corpus_tokens", "512", "--context_length", "16", "--seed", "0", NP),
]
