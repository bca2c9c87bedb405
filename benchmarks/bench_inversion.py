"""Output-matching inversion on SmolLM2-135M at layer 0: token recovery over 20 short English
texts (5-10 tokens) that nothing in featopt hard-codes.

    . .venv/bin/activate && FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_inversion.py \
        '{"objective": "l1", "prior": "embedding", "lr": 0.01, "steps": 600, "decoder": "pinv"}' \
        '{"objective": "cosine", "prior": "simplex", "lr": 0.05, "steps": 500}'

Each JSON argument is one setting (any InversionConfig fields); each prints the token recovery,
the exact-match rate and the time.
"""

import json
import logging
import os
import sys
import time
import warnings

os.environ.setdefault("FEATOPT_MODEL_PATH", "../shared/models")
warnings.filterwarnings("ignore")
import lightning.pytorch  # noqa: E402,F401

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)

from featopt.models import load_model  # noqa: E402
from featopt.commands.invert import InversionConfig
from featopt.commands.invert import invert as run  # noqa: E402

TEXTS = [
    "The cat sat on the mat.",
    "I love reading books at night.",
    "She opened the window slowly.",
    "We went to the beach yesterday.",
    "The weather is cold today.",
    "My brother plays the guitar.",
    "Please close the door behind you.",
    "He drank a cup of coffee.",
    "The train arrives at noon.",
    "Birds sing in the morning.",
    "Where is the nearest hospital?",
    "This soup tastes really good.",
    "They built a house near the river.",
    "Water boils at one hundred degrees.",
    "The children laughed at the clown.",
    "Can you help me with this?",
    "Paris is the capital of France.",
    "I forgot my keys again.",
    "The old man walked his dog.",
    "Dinner will be ready soon.",
]


def main(argv: list[str]) -> None:
    adapter = load_model("smollm2-135m-instruct")
    print("token lengths", [len(adapter.encode(t)) for t in TEXTS])
    for setting in [json.loads(a) for a in argv] or [{}]:
        config = InversionConfig(**{"model": "smollm2-135m-instruct", "layer": 0, "texts": TEXTS, "progress": False,
                                    "out": "featopt-runs/bench-inversion", "decode_every": 10**6, **setting})
        start = time.perf_counter()
        result = run(config, adapter)
        print(result.table())
        print(json.dumps(setting), {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)},
              f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
