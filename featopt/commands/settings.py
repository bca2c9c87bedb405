"""The settings commands share, declared once: small dataclass bases a command's config inherits.

Each field's docstring (the string below it) is its help text on the command line and in the
Python API's docstrings (:mod:`featopt.commands.fields`). A command redeclares a field only when
its meaning there differs (then with its own docstring) or its default does.

Bases list the fields in this order in a config that inherits several: model, what is scored,
the corpus, how it runs, where it writes; so a config lists its bases in reverse, the output
settings first (dataclasses take fields from the last base first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSettings:
    """The model a command loads."""

    model: str = "tiny-llama"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    trust_remote_code: bool = False
    """let a model folder or hub id run its own Python code (default off)"""
    dtype: str = "float32"
    """the model's dtype: float32, bfloat16, float16 or float64"""
    device_map: str | None = None
    """spread a model larger than one device over GPUs, the CPU and the disk (accelerate): auto, balanced,
    balanced_low_0, sequential, or a JSON file mapping module names to devices (0, cuda:1, cpu, disk)"""
    max_memory: str | None = None
    """with --device_map: the most each device may hold, as JSON, e.g. '{"0": "20GiB", "cpu": "60GiB"}'"""


@dataclass
class InputSettings(ModelSettings):
    """A model run on text."""

    bos: bool = False
    """start the model input with the tokenizer's BOS token, a fixed first token never searched or removed
    (default off: the source documents encode without one)"""


@dataclass
class ContextSettings(InputSettings):
    """A model run on corpus contexts."""

    bos: bool = False
    """start every context with the model's BOS token, counted in --context_length (off: as the source documents
    encode)"""


@dataclass
class SeedSettings:
    seed: int = 0
    """random seed"""


@dataclass
class UntrainedSettings(SeedSettings):
    untrained: bool = False
    """re-initialize the model from its config under --seed (is the feature learned, or does a random network show it?)"""


@dataclass
class TargetSettings:
    """What is scored: features of a site, by an objective (the same in every method)."""

    layer: int | str = 0
    """block index, 0-based (the documents' Block 1 is layer 0); several: "0,3,7" or "0-3" where a method takes them"""
    site: str = "resid_post"
    """resid_post (default), resid_pre, attn_out, mlp_out, mlp_hidden, blocks.L.KIND, or logits"""
    features: str = "[:, :, 0-4]"
    """feature spec: "[:, :, 0-4]" five problems, "[:, :, 0:4]" one combined, "[:, 0-4, 7]" one per position"""
    objective: str = "maximize"
    """what each problem scores: maximize, l1 (||C - O_f||_1 with C = --target), or an expression such as
    "l1_target(C=100) - 0.5 * maximize(site='blocks.2.mlp_out', features='[:, :, 3]')" (docs/extending.md)"""
    target: float = 100.0
    """the constant C of the L1 objective ||C - O_f(e)||_1"""
    sae: str | None = None
    """an SAE folder (SAELens, sparsify or Gemma Scope format): its latents are the features, at its own site"""


@dataclass
class DeviceSettings:
    """Where a discrete search runs."""

    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda, cuda:N or mps"""
    devices: int = 1
    """processes; the candidates are sharded across them"""


@dataclass
class TrainerSettings:
    """A Lightning run: precision, devices, logging, checkpoints."""

    precision: str = "32-true"
    """32-true, bf16-mixed, 16-mixed or 64-true"""
    devices: int = 1
    """number of devices (processes) per node"""
    num_nodes: int = 1
    """number of nodes (machines), each running --devices processes: Lightning's launch, by torchrun, SLURM
    or MASTER_ADDR, MASTER_PORT and NODE_RANK set on every node"""
    accelerator: str = "auto"
    """auto, cpu, gpu"""
    strategy: str = "auto"
    """auto (ddp_spawn on CPU, ddp on GPU when devices > 1) or any Lightning strategy"""
    log_every: int = 10
    """log scalars every N steps"""
    checkpoint_every: int = 0
    """save a checkpoint every N steps (0: never)"""
    resume: str | None = None
    """checkpoint file to resume from"""


@dataclass
class CorpusSettings:
    """Text read from a corpus, cut into contexts."""

    corpus: str = ""
    """a folder of .txt files (searched recursively) or one .txt file"""
    split: str = "all"
    """all, train or eval (the last --eval_fraction of every document, which sae train holds out)"""
    eval_fraction: float = 0.05
    """the last fraction of every document that is the eval split"""
    context_length: int = 128
    """tokens per context (the BOS token of --bos counted)"""
    skip_first: int = 1
    """leading positions of every context left out (position 0: an attention sink)"""


@dataclass
class FolderSettings:
    """Where a command writes (a command that shows no progress)."""

    out: str | None = None
    """output folder (default featopt-runs/<time>)"""


@dataclass
class OutputSettings(FolderSettings):
    progress: bool = True
    """show progress"""
