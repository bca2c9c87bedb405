"""Text corpora as fixed-length token contexts (for SAE training, evaluation, corpus statistics).

A corpus is a folder of UTF-8 `.txt` files (searched recursively, one document per file) or a
single `.txt` file. Each document is tokenized without special tokens; the last `eval_fraction`
of every document's tokens is held out, so `split="train"` and `split="eval"` never share text.
Each split's documents are joined with the tokenizer's end-of-text token between them and cut
into contexts of `context_length` tokens (a short remainder is dropped). With a BOS id (`--bos`)
every context is that BOS token followed by `context_length - 1` corpus tokens, still
`context_length` long, as SAELens counts the BOS it prepends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError

SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root
    text: str


def read_corpus(path: str | Path) -> list[Document]:
    """Every non-empty `.txt` document under `path`, in sorted path order."""
    root = Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = sorted(p for p in root.rglob("*.txt") if p.is_file()), root
    else:
        raise FeatoptError(f"corpus {str(path)!r} does not exist: give a folder of .txt files or one .txt file.")
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            raise FeatoptError(f"corpus file {str(file)!r} cannot be read as UTF-8 text ({error.__class__.__name__}).") from None
        if text.strip():
            docs.append(Document(str(file.relative_to(base)), text))
    if not docs:
        raise FeatoptError(f"corpus {str(path)!r} holds no text: give a folder with non-empty .txt files or one .txt file.")
    return docs


def _separator(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


@dataclass
class ContextSources:
    """Where every token of :func:`corpus_contexts`' contexts `[n, L]` comes from.

    `documents[d]` is the name (path relative to the corpus root) of document index `d`;
    `doc [n, L]` (int32) is each token's document index and `pos [n, L]` (int32) its index in
    that document's whole token list (so eval-split tokens start past the train part); both
    are -1 on the end-of-text separators between documents and on the BOS column of `--bos`.
    """

    documents: list[str]
    doc: Tensor
    pos: Tensor


def corpus_contexts(
    tokenizer, path: str | Path, context_length: int, *, split: str = "train", eval_fraction: float = 0.05,
    max_tokens: int | None = None, with_sources: bool = False, bos: int | None = None,
) -> Tensor | tuple[Tensor, ContextSources]:
    """Token contexts `[contexts, context_length]` (long) of one split of a corpus.

    `max_tokens` stops reading once that many tokens are gathered (whole contexts only, each
    counted at its full `context_length`). `bos`, a token id (the model's BOS under `--bos`),
    starts every context: `[bos]` and the next `context_length - 1` tokens of the same stream.
    `with_sources=True` returns `(contexts, sources)`, sources a :class:`ContextSources` that
    says which document and position each token comes from (the contexts are the same).
    """
    if split not in SPLITS:
        raise FeatoptError(f"--split {split!r} is not a corpus split: allowed are {', '.join(SPLITS)}.")
    if context_length < 2:
        raise FeatoptError(f"--context_length {context_length} is too short: a context length must be at least 2 tokens.")
    if not 0.0 <= eval_fraction < 1.0:
        raise FeatoptError(f"--eval_fraction (the held-out fraction) must be in [0, 1), got {eval_fraction}.")
    if tokenizer is None:
        raise FeatoptError("this model has no tokenizer, so a text corpus cannot be read.")
    stream: list[int] = []
    sep = _separator(tokenizer)
    names: list[str] = []
    where: list[tuple[Tensor, Tensor]] = []  # per document: (doc index, position) of its tokens and separator
    for doc in read_corpus(path):
        ids = tokenizer.encode(doc.text, add_special_tokens=False, verbose=False)  # long documents are fine here
        cut = len(ids) - int(round(len(ids) * eval_fraction))
        part = {"train": ids[:cut], "eval": ids[cut:], "all": ids}[split]
        if part:
            stream += part + sep
            if with_sources:
                first = cut if split == "eval" else 0  # positions count in the whole document
                none = torch.full((len(sep),), -1, dtype=torch.int32)
                where.append((torch.cat([torch.full((len(part),), len(names), dtype=torch.int32), none]),
                              torch.cat([torch.arange(first, first + len(part), dtype=torch.int32), none])))
                names.append(doc.name)
        if max_tokens is not None and len(stream) >= max_tokens + context_length:
            break
    body = context_length - (bos is not None)  # corpus tokens per context
    n = len(stream) // body
    if max_tokens is not None:
        n = min(n, -(-max_tokens // context_length))
    if n == 0:
        raise FeatoptError(f"the {split} split of corpus {str(path)!r} has {len(stream)} tokens, fewer than one "
                           f"context of {body}{' after the BOS token' if bos is not None else ''}: give more text "
                           f"or a shorter context.")
    contexts = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        contexts = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), contexts], dim=1)
    if not with_sources:
        return contexts
    doc, pos = (torch.cat(parts)[: n * body].view(n, body) for parts in zip(*where))
    if bos is not None:
        doc, pos = (torch.cat([torch.full((n, 1), -1, dtype=torch.int32), t], dim=1) for t in (doc, pos))
    return contexts, ContextSources(names, doc, pos)
