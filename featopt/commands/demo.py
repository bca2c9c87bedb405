"""`featopt demo`: a short tour of what featopt does, on the best model available offline.

With `FEATOPT_MODEL_PATH` pointing at a folder holding SmolLM2-135M-Instruct (a real trained
model) the tour runs on it; otherwise on the built-in random `tiny-llama`, and it says so.
"""

from __future__ import annotations

from pathlib import Path

from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.models.loading import available_models
from featopt.gradient.ascent import AscentConfig, format_results, run

REAL_MODEL = "smollm2-135m-instruct"


def pick_model() -> tuple[str, str]:
    """The model name to use and a sentence saying why."""
    if any(name.lower().startswith(REAL_MODEL) for name in available_models()):
        return REAL_MODEL, f"the real trained {REAL_MODEL}, found under FEATOPT_MODEL_PATH"
    return "tiny-llama", ("the built-in tiny-llama (random weights: its features mean nothing); "
                          "set FEATOPT_MODEL_PATH=../shared/models to run on the real SmolLM2-135M")


def demo(out: str | Path = "featopt-runs/demo", steps: int | None = None) -> None:
    if steps is not None and steps < 1:
        raise FeatoptError(f"--steps must be at least 1, got {steps}.")
    name, why = pick_model()
    steps = steps or (200 if name == REAL_MODEL else 100)
    print(f"featopt demo on {why}.\n")
    adapter = load_model(name)
    last = adapter.n_layers - 1
    tours = [
        ("Embedding ascent on 5 neurons of block 1 (layer 0), all 5 positions each", dict(layer=0)),
        (f"The same neurons of the last block (layer {last}) run alone, without the blocks before it",
         dict(layer=last, isolated=True)),
        ("Neuron 0 of layer 0 at each position in turn", dict(layer=0, features="[:, 0-4, 0]")),
    ]
    out = Path(out)
    for i, (title, options) in enumerate(tours, 1):
        config = AscentConfig(**{"model": name, "features": "[:, :, 0-4]", "tokens": 5, "steps": steps,
                                 "out": str(out / f"{i}"), "progress": False, **options})
        print(f"{i}. {title}  [featopt optimize --model {name} --layer {config.layer} --features \"{config.features}\""
              f"{' --isolated' if config.isolated else ''} --steps {steps}]")
        result = run(config, adapter)
        print(format_results(result.results))
        print(f"   results: {result.out / 'results.json'}\n")
    print("activation: the decoded tokens re-measured by a forward pass; continuous: the optimized embeddings.")
