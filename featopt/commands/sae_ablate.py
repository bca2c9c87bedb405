"""`featopt sae ablate`: which earlier tokens one latent depends on (ablated text: drop each earlier
token in turn) and what removing its direction does to the next-token log-probs (direction
ablation), on one text; written to `ablate.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice
from featopt.commands.result import CommandResult
from featopt.commands.sae_read import load_model_and_sae, record_meta, write_record
from featopt.commands.settings import FolderSettings, InputSettings
from featopt.dictionaries.ablation import MODES, ablated_text, direction_ablation
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.runs.outdir import out_folder


@dataclass
class AblateConfig(FolderSettings, InputSettings):
    """Settings of `featopt sae ablate`: which earlier tokens a latent depends on (ablated text),
    and what removing its direction does to the next-token log-probs (direction ablation)."""

    bos: bool = False
    """run the model's BOS token first, at position 0, never removed (off: as the source documents encode)"""
    sae: str = ""
    """the SAE folder"""
    latent: int = 0
    """the latent"""
    text: str = ""
    """the context"""
    position: int | None = None
    """the target token, 0-based in the model input (with --bos, 0 is its BOS token; default: where the latent is largest)"""
    mode: str = "contribution"
    """contribution (x - z_i W_dec[i]) or projection (remove the direction)"""
    top: int = 10
    """tokens whose log-prob changed most"""


@dataclass
class AblateRun(CommandResult):
    record: dict
    out: Path = field(default_factory=Path)

    def table(self) -> str:
        text = self.record["ablated_text"]
        first = text.get("first", 0)  # 1 with --bos: the BOS token at position 0 is kept
        kept = " (the BOS token at position 0 kept)" if first else ""
        lines = [f"latent {self.record['latent']} at position {text['target']} ({text['tokens'][text['target']]!r}): "
                 f"{text['base']:.4g}; removing each earlier token{kept} changes it by"]
        if max(self.record["activations"][first:]) <= 0:
            return f"latent {self.record['latent']} is 0 at every position of this text; nothing to ablate."
        for token, change, rel in zip(text["tokens"][first:], text["change"], text["relative"]):
            lines.append(f"  {token!r:<20} {change:+.4g}" + (f"  ({rel:+.1%})" if rel is not None else ""))
        direction = self.record["direction_ablation"]
        lines.append(f"direction ablation ({direction['mode']}), next-token log-prob changes: "
                     + " ".join(f"{d:+.2f}" for d in direction["delta"][0]))
        lines.append("most decreased: " + ", ".join(f"{t!r} {v:+.3g}" for t, v in direction["decreased"]))
        return "\n".join(lines)


def ablate(config: AblateConfig, adapter: ModelAdapter | None = None) -> AblateRun:
    """Ablated text at the target token (default: where the latent is largest) and direction
    ablation over the whole text, for latent `config.latent`."""
    from featopt.models.sae.attach import site_of

    check_at_least(config, ["top"])
    check_choice(config, "mode", MODES)
    adapter, sae = load_model_and_sae(config, adapter)
    if not 0 <= config.latent < sae.d_sae:
        raise FeatoptError(f"--latent {config.latent} is out of range: this SAE has {sae.d_sae} latents (0-{sae.d_sae - 1}).")
    if not config.text.strip():
        raise FeatoptError("--text is empty: give a text of at least two tokens.")
    ids = adapter.encode(config.text)  # [BOS, text...] with --bos: positions count the model input
    kept = int(adapter.bos)  # the BOS token at position 0 is never removed
    if len(ids) - kept < 2:
        raise FeatoptError(f"--text {config.text!r} is {len(ids) - kept} token: give at least two tokens.")
    adapter.check_positions(len(ids), f"--text of {len(ids) - kept} tokens", "shorten it")
    site = adapter.site(site_of(sae))
    with torch.inference_mode():
        z = sae.encode(adapter.run([site], input_ids=ids[None])[site])[0, :, config.latent].float()
    first = kept + 1  # the first token with an earlier (removable) token
    position = int(z[first:].argmax()) + first if config.position is None else config.position
    if not first <= position < len(ids):
        after = " after the BOS token at position 0" if kept else ""
        raise FeatoptError(f"--position {position} is out of range: the text has {len(ids) - kept} tokens{after}, so "
                           f"give {first} to {len(ids) - 1} (a token with earlier tokens to remove).")
    decode = adapter.decode  # ids -> text
    ablated = ablated_text(adapter, sae, config.latent, ids, position, first=kept)
    direction = direction_ablation(adapter, sae, config.latent, ids[None], mode=config.mode, top=config.top)
    record = {"latent": config.latent, "position": position, "activations": z.tolist(),
              "ablated_text": ablated.record(decode), "direction_ablation": direction.record(decode)}
    out = out_folder(config.out)
    write_record(out, "ablate.json", {"run": record_meta("sae ablate", config, adapter, sae), **record})
    return AblateRun(record, out)
