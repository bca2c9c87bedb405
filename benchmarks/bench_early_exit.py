"""Early exit vs full depth: optimization steps per second of featopt's embedding ascent.

One step = forward to the site + backward + Adam step, over the 5 problems of
`--features "[:, :, 0-4]"` x 5 tokens. "featopt" is the module's own step (`step_losses`, which runs
`ModelAdapter.run` and stops at the site); "full" computes the same objective from a plain HF forward
through every block, final norm and LM head (`model(inputs_embeds=..., output_hidden_states=True)
.hidden_states[layer + 1]`, as the reference code does); "blocks" is the same without the LM head
(`model.base_model`), to show how much of the gap is the head alone. Same model, problems, start and steps;
warm-up steps are excluded and the median of `--repeats` timings is reported. Both losses (and input
gradients) are asserted equal at the first step, so a speed-up cannot come from computing something else.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_early_exit.py [--steps 6 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, load_model
from featopt.commands.optimize import AscentConfig, build
from featopt.objectives.objective import Context

MODELS = ("smollm2-135m-instruct", "gpt2-small-shaped")
RTOL = 1e-4


def gpt2_small_shaped(seed: int) -> ModelAdapter:
    """GPT2Config() defaults (12 layers, d=768, vocab 50257), random weights, no tokenizer."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)  # frozen, as load_model does
    return ModelAdapter(model, None, name="gpt2-small-shaped")


MODES = ("featopt", "full", "blocks")  # early exit; whole HF model (reference); base model, no LM head


def step_fn(module, mode: str):
    """The loss of one step: featopt's own (early exit) or the same objective at full depth."""
    adapter, objective, selection = module.adapter, module.objective, module.selection
    rows = torch.arange(module.parametrization.n_problems)
    layer = selection.site.layer

    def featopt_losses():
        return module.step_losses(rows)[0]

    def full_losses():
        embeds = module.parametrization(rows)
        net = adapter.model if mode == "full" else adapter.base  # base: all blocks + final norm, no LM head
        hidden = net(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states
        acts = {selection.site: hidden[layer + 1]}
        selection.activation(acts[selection.site].float(), rows)  # featopt's step computes it too
        return objective.loss(Context(acts, embeds, rows, adapter))

    return featopt_losses if mode == "featopt" else full_losses


def check_same(module) -> float:
    """First-step losses and input gradients of all paths agree; returns the largest relative gap."""
    params = module.parametrization.embeds
    out = {}
    for mode in MODES:
        params.grad = None
        loss = step_fn(module, mode)()
        loss.sum().backward()
        out[mode] = (loss.detach(), params.grad.clone())
    params.grad = None
    l_e, g_e = out["featopt"]
    worst = 0.0
    for mode in MODES[1:]:
        l_f, g_f = out[mode]
        gap = ((l_e - l_f).abs().max() / l_f.abs().max()).item()
        ggap = ((g_e - g_f).abs().max() / g_f.abs().max().clamp_min(1e-30)).item()
        assert gap <= RTOL, f"losses differ: early exit {l_e.tolist()} vs {mode} {l_f.tolist()}"
        assert ggap <= RTOL, f"input gradients differ from {mode} by {ggap:.2e} (relative to the largest)"
        worst = max(worst, gap, ggap)
    return worst


def steps_per_second(module, mode: str, steps: int, warmup: int, start: torch.Tensor) -> float:
    with torch.no_grad():
        module.parametrization.embeds.copy_(start)  # every timing starts from the same point
    optimizer = module.configure_optimizers()  # Adam over the parametrization, lr from the config
    losses = step_fn(module, mode)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses().sum().backward()
        optimizer.step()
    return steps / (time.perf_counter() - t0)


def bench(adapter: ModelAdapter, args) -> list[tuple]:
    n = adapter.n_layers
    rows = []
    for layer in sorted({0, n // 2, n - 2}):  # last-but-one: HF's last hidden state is final-normed
        config = AscentConfig(model=adapter.name, layer=layer, features="[:, :, 0-4]", tokens=5,
                              seed=args.seed, progress=False)
        module = build(config, adapter)
        start = module.parametrization.embeds.detach().clone()
        gap = check_same(module)
        rates = {mode: [] for mode in MODES}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            for mode in MODES:
                rates[mode].append(steps_per_second(module, mode, args.steps, args.warmup, start))
        fo, fd, fb = (statistics.median(rates[mode]) for mode in MODES)
        rows.append((adapter.name, f"{layer}/{n}", fo, fd, fo / fd, fb, fo / fb))
        spread = max((max(r) - min(r)) / statistics.median(r) for r in rates.values())
        print(f"  {adapter.name} layer {layer}: featopt {fo:.2f}/s, full {fd:.2f}/s (x{fo / fd:.2f}), "
              f"blocks only {fb:.2f}/s (x{fo / fb:.2f}); first-step max rel. gap {gap:.1e}; "
              f"worst repeat spread {spread:.0%}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timings per cell; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: gpt2-small-shaped and/or load_model names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps x {args.repeats} repeats "
          f"(+{args.warmup} warm-up), 5 problems x 5 tokens, fp32 CPU", flush=True)
    table, skipped = [], []
    for name in args.models.split(","):
        if name == "gpt2-small-shaped":
            adapter = gpt2_small_shaped(args.seed)
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from FEATOPT_MODEL_PATH only, never the hub
            try:
                adapter = load_model(name)
            except FeatoptError:
                skipped.append(f"{name}: skipped (not found under FEATOPT_MODEL_PATH="
                               f"{os.environ.get('FEATOPT_MODEL_PATH', '')!r})")
                continue
        table += bench(adapter, args)
    print("\n| model | layer / blocks | featopt steps/s | full-depth steps/s | ratio (featopt / full) "
          "| full blocks, no LM head, steps/s | ratio (featopt / that) |")
    print("|---|---|---|---|---|---|---|")
    for name, layer, fo, fd, ratio, fb, ratio_b in table:
        print(f"| {name} | {layer} | {fo:.2f} | {fd:.2f} | {ratio:.2f}x | {fb:.2f} | {ratio_b:.2f}x |")
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
