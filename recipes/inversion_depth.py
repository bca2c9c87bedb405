"""Document 000's inversion against depth: token recovery of `featopt invert` per layer, L1 and cosine.

One `featopt invert` run per (objective, layer) on the same five texts, each into
`<out>/inv<steps>-<objective>-L<layer>` (a folder that already holds results.json is not run
again); then the token recovery at the last step is read from each run's results.json (both
decoders: pinv, the document's, and nearest cosine, featopt's default), or at `--at` from the
TensorBoard logs (`inversion/token_recovery`, nearest only), and plotted.

    FEATOPT_MODEL_PATH=../shared/models python recipes/inversion_depth.py --layers 0,4,12 --steps 100 --png docs/img/repro-inversion-depth.png
    python recipes/inversion_depth.py --layers 0,4,12 --steps 100 --collect   # read and plot only
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

TEXTS = ["The cat sat on the mat.", "I love reading books at night.", "She opened the window slowly.",
         "We went to the beach yesterday.", "The weather is cold today."]  # bench_inversion.py's first five
OBJECTIVES = ("l1", "cosine")
DECODERS = ("pinv", "nearest")  # the document's pseudoinverse, and featopt's default nearest cosine


def folder(out: Path, steps: int, objective: str, layer: int) -> Path:
    return out / f"inv{steps}-{objective}-L{layer}"


def invert(args, objective: str, layer: int) -> None:
    target = folder(Path(args.out), args.steps, objective, layer)
    if (target / "results.json").exists():
        return
    cmd = ["featopt", "invert", "--model", args.model, "--layer", str(layer), "--objective", objective,
           "--steps", str(args.steps), "--decode_every", str(args.decode_every), "--no_progress", "--out", str(target)]
    for text in TEXTS:
        cmd += ["--text", text]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def recovery(out: Path, objective: str, layer: int) -> dict[int, float]:
    """`{step: token recovery}` from the TensorBoard logs of every run of this objective and layer
    under `out`, any step count (plain Adam, no schedule: a longer run's first N steps are an
    N-step run), so a longer run stopped early still gives its decoded steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve = {}
    for events in sorted(glob.glob(str(out / f"inv*-{objective}-L{layer}" / "tensorboard" / "events*"))):
        acc = EventAccumulator(events)
        acc.Reload()
        if "inversion/token_recovery" in acc.Tags()["scalars"]:
            curve.update({s.step: s.value for s in acc.Scalars("inversion/token_recovery")})
    return curve


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="0,4,12")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--decode_every", type=int, default=50)
    parser.add_argument("--at", type=int, default=None, help="the step compared across layers (default: --steps)")
    parser.add_argument("--out", default="featopt-runs/repro")
    parser.add_argument("--png", default=None)
    parser.add_argument("--collect", action="store_true", help="only read the runs already made")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    at = args.at or args.steps
    if not args.collect:
        for objective in OBJECTIVES:
            for layer in layers:
                invert(args, objective, layer)
    # The final metrics score both decoders (results.json); the TensorBoard curve only the run's own.
    table = {}
    for obj in OBJECTIVES:
        for layer in layers:
            final = folder(Path(args.out), args.steps, obj, layer) / "results.json"
            metrics = json.loads(final.read_text())["run"]["metrics"] if final.exists() and at == args.steps else {}
            table[obj, layer] = {"nearest": metrics.get("token_recovery_nearest", recovery(Path(args.out), obj, layer).get(at)),
                                 "pinv": metrics.get("token_recovery_pinv")}
    print(f"token recovery at step {at} (lr 0.01, {len(TEXTS)} texts; -: not measured)")
    columns = [(obj, dec) for obj in OBJECTIVES for dec in DECODERS]
    print("layer  " + "  ".join(f"{obj + ' ' + dec:>14}" for obj, dec in columns))
    for layer in layers:
        cells = [table[obj, layer][dec] for obj, dec in columns]
        print(f"{layer:>5}  " + "  ".join(f"{'-':>14}" if v is None else f"{v:14.1%}" for v in cells))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
        for (obj, dec), style in zip(columns, ("o-C0", "o--C0", "s-C1", "s--C1")):
            points = [(layer, table[obj, layer][dec]) for layer in layers if table[obj, layer][dec] is not None]
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, label=f"{obj}, {dec} decoding")
        ax.set(xlabel="layer (0-based)", ylabel="tokens recovered (%)", ylim=(0, 100),
               title=f"{args.model}: inversion after {at} steps")
        ax.set_xticks(layers)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main(sys.argv[1:])
