"""Per-latent corpus statistics as data: :class:`FeatureStats` (top and uniform examples with their
context windows, frequency, histogram), saved as `features.safetensors` + `features.json` and read
back, and each latent's JSON record (what `featopt sae features` writes and the dashboard shows).
:mod:`featopt.dictionaries.corpus_stats` computes them in one streamed pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.data import ContextSources
from featopt.errors import FeatoptError

FORMAT, VERSION = "featopt-feature-stats", 1
TENSORS = ("top_values", "top_index", "top_tokens", "top_acts", "top_doc", "top_pos", "bin_width", "bin_counts",
            "bin_index", "bin_values", "bin_tokens", "bin_acts", "bin_doc", "bin_pos", "freq", "max", "sum")


def locate(index: Tensor, sources: ContextSources | None, length: int) -> tuple[Tensor, Tensor]:
    """Document index and position `[...]` (int32, -1 unknown) of global token indices `index [...]`."""
    if sources is None:
        return torch.full(index.shape, -1, dtype=torch.int32), torch.full(index.shape, -1, dtype=torch.int32)
    if sources.doc.dim() != 2 or sources.doc.shape[1] != length or int(index.max()) >= sources.doc.numel():
        raise FeatoptError(f"the sources ({tuple(sources.doc.shape)}) are not those of the contexts of {length} tokens "
                           f"the statistics were taken on: give the sources corpus_contexts returned with them.")
    safe = index.clamp(min=0)
    return tuple(torch.where(index >= 0, t.reshape(-1).cpu()[safe], -1).to(torch.int32) for t in (sources.doc, sources.pos))


@dataclass
class FeatureStats:
    """Per-latent corpus statistics (see the module docstring). Shapes, `W = before + 1 + after`:
    `top_*` `[d_sae, k]` (windows `[d_sae, k, W]`), `bin_*` `[d_sae, n_bins]` (windows
    `[d_sae, n_bins, W]`), `freq`, `max`, `sum`, `bin_width` `[d_sae]`. Index -1 marks an empty
    slot (value 0); doc/pos -1 an unknown source; window tokens -1 lie outside the context."""

    top_values: Tensor  # float32, descending
    top_index: Tensor  # int64 global token index c * L + p
    top_tokens: Tensor  # int32
    top_acts: Tensor  # float32
    top_doc: Tensor  # int32, into documents
    top_pos: Tensor  # int32, position in the document
    bin_width: Tensor  # float32, a power of two (0: never fired)
    bin_counts: Tensor  # int64
    bin_index: Tensor
    bin_values: Tensor
    bin_tokens: Tensor
    bin_acts: Tensor
    bin_doc: Tensor
    bin_pos: Tensor
    freq: Tensor  # int64, tokens with z > 0
    max: Tensor  # float32
    sum: Tensor  # float64
    tokens: int
    documents: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    window: tuple[int, int] = (24, 8)
    context_length: int = 0

    @property
    def d_sae(self) -> int:
        return self.freq.shape[0]

    def save(self, folder: str | Path) -> Path:
        """Write `features.safetensors` and `features.json` into `folder`, each atomically."""
        from safetensors.torch import save_file

        from featopt.results import atomic_write

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in TENSORS}
        header = {"format": FORMAT, "version": VERSION, "d_sae": self.d_sae, "top_k": self.top_values.shape[1],
                  "n_bins": self.bin_counts.shape[1], "window": list(self.window), "context_length": self.context_length,
                  "tokens": self.tokens, "documents": self.documents, "meta": self.meta}
        text = json.dumps(header, indent=2, ensure_ascii=False, default=str)
        atomic_write(out / "features.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write(out / "features.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """Read back what :meth:`save` wrote."""
        from safetensors.torch import load_file

        folder = Path(folder)
        files = folder / "features.json", folder / "features.safetensors"
        if not all(f.is_file() for f in files):
            raise FeatoptError(f"{str(folder)!r} holds no corpus statistics (features.json and features.safetensors): "
                               f"give a folder written by FeatureStats.save.")
        header = json.loads(files[0].read_text(encoding="utf-8"))
        tensors = load_file(str(files[1]))
        if header.get("format") != FORMAT or header.get("version") != VERSION or set(tensors) != set(TENSORS):
            raise FeatoptError(f"{str(files[0])!r} is not version {VERSION} of featopt's corpus statistics: write it again.")
        return cls(**tensors, tokens=header["tokens"], documents=header["documents"], meta=header["meta"],
                   window=tuple(header["window"]), context_length=header["context_length"])

    def _example(self, kind: str, i: int, j: int, decode: Callable[[int], str]) -> dict:
        index, doc, pos = (int(getattr(self, f"{kind}_{name}")[i, j]) for name in ("index", "doc", "pos"))
        tokens, acts = getattr(self, f"{kind}_tokens")[i, j].tolist(), getattr(self, f"{kind}_acts")[i, j].tolist()
        return {"activation": float(getattr(self, f"{kind}_values")[i, j]), "context": index // self.context_length,
                "index": index % self.context_length, "document": self.documents[doc] if doc >= 0 else None,
                "position": pos if pos >= 0 else None, "tokens": [decode(t) for t in tokens if t >= 0],
                "acts": [a for t, a in zip(tokens, acts) if t >= 0],
                "target": self.window[0] - sum(t < 0 for t in tokens[: self.window[0]])}  # padding lies only before or after

    def record(self, latent: int, decode: Callable[[int], str]) -> dict:
        """Latent `latent`'s JSON-able record; `decode(id)` spells one token."""
        if not 0 <= latent < self.d_sae:
            raise FeatoptError(f"latent {latent} is out of range: this SAE has latents 0 .. {self.d_sae - 1}.")
        i, fires, width = latent, int(self.freq[latent]), float(self.bin_width[latent])
        counts = self.bin_counts[i].tolist()
        return {
            "latent": i, "tokens": self.tokens, "fires": fires, "frequency": fires / self.tokens if self.tokens else 0.0,
            "max": float(self.max[i]), "mean_when_active": float(self.sum[i]) / fires if fires else 0.0,
            "histogram": {"bin_width": width, "counts": counts},
            "top_examples": [self._example("top", i, j, decode) for j in range(self.top_index.shape[1])
                             if self.top_index[i, j] >= 0],
            "uniform_examples": [{"bin": [b * width, (b + 1) * width], "count": counts[b], **self._example("bin", i, b, decode)}
                                 for b in range(len(counts)) if self.bin_index[i, b] >= 0],
        }
