"""`featopt demo`: featopt's story in a few minutes, on the best model available offline.

The same features answered three ways, side by side, every answer re-measured by a plain forward:
gradient ascent on continuous inputs (the source documents' method) decoded to tokens, the
exhaustive sweep over every token (the exact optimum for one token), and GCG over real tokens.
With `FEATOPT_MODEL_PATH` pointing at a folder holding SmolLM2-135M-Instruct (a real trained
model) the tour runs on it; otherwise on the built-in random `tiny-llama`, and it says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featopt.commands.compare import CompareConfig, compare
from featopt.commands.optimize import AscentConfig, optimize
from featopt.commands.result import CommandResult
from featopt.commands.swaps import GCGConfig, gcg
from featopt.commands.tables import aligned
from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.models.loading import available_models

REAL_MODEL = "smollm2-135m-instruct"


@dataclass
class DemoConfig:
    """Settings of `featopt demo`."""

    out: str = "featopt-runs/demo"
    """output folder (each part's runs go in a subfolder)"""
    steps: int | None = None
    """gradient steps (default: 200 on the real model, 100 on the tiny one)"""
    model: str | None = None
    """the model (default: SmolLM2-135M-Instruct when FEATOPT_MODEL_PATH finds it, else the built-in tiny-llama)"""


@dataclass
class DemoRun(CommandResult):
    text: str
    out: Path
    printed = True

    def table(self) -> str:
        return self.text


def pick_model() -> tuple[str, str]:
    """The model name to use and a sentence saying why."""
    if any(name.lower().startswith(REAL_MODEL) for name in available_models()):
        return REAL_MODEL, f"the real trained {REAL_MODEL}, found under FEATOPT_MODEL_PATH"
    return "tiny-llama", ("the built-in tiny-llama (random weights: its features mean nothing); "
                          "set FEATOPT_MODEL_PATH=../shared/models to run on the real SmolLM2-135M")


def demo(config: DemoConfig) -> DemoRun:
    """Two parts: one-token inputs against the exact optimum (`featopt compare`), then six-token
    inputs, gradient ascent against GCG. Prints as it goes; returns the whole text."""
    if config.steps is not None and config.steps < 1:
        raise FeatoptError(f"--steps must be at least 1, got {config.steps}.")
    name, why = (config.model, f"{config.model}") if config.model else pick_model()
    real = name == REAL_MODEL
    steps = config.steps or (200 if real else 100)
    out = Path(config.out)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"featopt demo on {why}.\n")
    adapter = load_model(name)
    layer = min(8, adapter.n_layers - 1)
    features = "[:, :, 0-4]"
    say(f"1. Which single token makes each of 5 neurons of layer {layer}'s output fire most? The exhaustive sweep tries "
        f"all {adapter.vocab_size:,} tokens, so its answer is exact; gradient ascent (free embeddings decoded by "
        "pseudoinverse, and the softmax-simplex prior) and GCG over real tokens search for it.")
    say(f"   [featopt compare --model {name} --layer {layer} --features \"{features}\" "
        f"--methods embedding-pinv,simplex-argmax,gcg --steps {steps}]")
    found = compare(CompareConfig(model=name, layer=layer, features=features, steps=steps, progress=False,
                                  methods=["embedding-pinv", "simplex-argmax", "gcg"], out=str(out / "1-compare")), adapter)
    say(found.table())
    means = {s["method"]: s for s in found.summary}
    say("   Gradient ascent's decoded token reaches {:.0%} of the optimum on average, the simplex prior {:.0%}; GCG finds "
        "the optimum for {} of {}.\n".format(means["embedding-pinv"]["mean_fraction"] or 0,
                                             means["simplex-argmax"]["mean_fraction"] or 0,
                                             round(means["gcg"]["optimal_share"] * means["gcg"]["features"]),
                                             means["gcg"]["features"]))
    tokens = 6
    say(f"2. Inputs of {tokens} tokens for the same neurons, where no sweep can be exhaustive: gradient ascent against GCG, "
        "each answer's activation re-measured by a plain forward of its tokens.")
    say(f"   [featopt optimize --objective maximize --tokens {tokens} ...]  [featopt search gcg --tokens {tokens} ...]")
    ascent = optimize(AscentConfig(model=name, layer=layer, features=features, tokens=tokens, steps=steps,
                                   objective="maximize", progress=False, out=str(out / "2-ascent")), adapter)
    search = gcg(GCGConfig(model=name, layer=layer, features=features, tokens=tokens, steps=20 if real else 10,
                           search_width=128, progress=False, out=str(out / "2-gcg")), adapter)
    rows = [["feature", "gradient ascent (decoded)", "activation", "GCG", "activation"]]
    for a, g in zip(ascent.results, search.results):
        rows.append([a.spec, repr(a.text), f"{a.activation:.4g}", repr(g.text), f"{g.activation:.4g}"])
    say(aligned(rows))
    wins = sum(g.activation > a.activation for a, g in zip(ascent.results, search.results))
    say(f"   GCG's input fires the neuron more than the decoded gradient input for {wins} of {len(rows) - 1} neurons.\n")
    say("Every activation above is the found tokens' own, re-measured by a forward pass; the continuous optimum of "
        "gradient ascent rarely survives decoding, which is why featopt's discrete searches exist.")
    say(f"Runs: {out}/ (results.json, TensorBoard, the compare table as compare.json).")
    return DemoRun("\n".join(lines), out)
