"""`featopt sae cache`: a corpus' activations at one or more sites, saved for `sae train
--activations` (input and output sites together for transcoders, e.g. blocks.6.mlp_in,blocks.6.mlp_out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featopt.commands.fields import check_at_least
from featopt.commands.loading import bos_id, check_context, load_for
from featopt.commands.result import CommandResult
from featopt.commands.sae_sites import site_list
from featopt.commands.settings import ContextSettings, OutputSettings
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, dtype_of
from featopt.results import versions
from featopt.runs.outdir import out_folder


@dataclass
class CacheConfig(OutputSettings, ContextSettings):
    """Settings of `featopt sae cache`: activations of a corpus' contexts, saved for training."""

    site: str = "blocks.1.resid_post"
    """site(s) to read, e.g. blocks.6.resid_post (comma-separated; blocks.0-29.mlp_in is every layer's)"""
    corpus: str = ""
    """a folder of .txt files (searched recursively) or one .txt file"""
    context_length: int = 128
    """tokens per context"""
    eval_fraction: float = 0.05
    """the last fraction of every document, held out from training"""
    split: str = "train"
    """train (what sae train reads), eval (the held-out text) or all"""
    max_tokens: int | None = None
    """cache at most this many tokens"""
    batch_contexts: int = 16
    """contexts per forward"""


@dataclass
class CacheRun(CommandResult):
    out: Path
    tokens: int

    def table(self) -> str:
        return f"cached {self.tokens} tokens"


def cache(config: CacheConfig, adapter: ModelAdapter | None = None) -> CacheRun:
    """Run the model over the corpus split's contexts and save the activations at every site of
    `config.site` as safetensors shards in `out` (`sae train --activations` reads them)."""
    from featopt.data import corpus_contexts
    from featopt.dictionaries.activations import ModelSource, write_cache

    check_at_least(config, ["context_length", "batch_contexts"])
    if config.max_tokens is not None and config.max_tokens < 1:
        raise FeatoptError(f"--max_tokens must be at least 1 (or unset: the whole split), got {config.max_tokens}.")
    dtype_of(config.dtype)
    if not config.corpus:
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    out = out_folder(config.out)
    if out.exists():
        raise FeatoptError(f"the cache folder {str(out)!r} already exists: give a new folder.")
    adapter = load_for(config, adapter)
    sites = site_list(adapter, config.site)
    check_context(adapter, config.context_length)
    contexts = corpus_contexts(adapter.tokenizer, config.corpus, config.context_length, split=config.split,
                               eval_fraction=config.eval_fraction, max_tokens=config.max_tokens, bos=bos_id(adapter))
    meta = {"model": adapter.name, "corpus": config.corpus, "split": config.split, "eval_fraction": config.eval_fraction,
            "context_length": config.context_length, "bos": adapter.bos, "versions": versions()}
    write_cache(ModelSource(adapter, contexts, sites, config.batch_contexts), out, meta, progress=config.progress)
    return CacheRun(out, int(contexts.numel()))
