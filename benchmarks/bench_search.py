"""Discrete searches: featopt's exhaustive sweep and cached greedy search vs the document's `search_maximal`.

The baseline is source document 000's `search_maximal` ("Greedy Search Features") as written: a
Python loop over the vocabulary in batches of 1000, a full HF forward per batch (`a_model`: every
block, final norm and LM head, reading `hidden_states[layer + 1]`), the prefix re-run for every
candidate, and activations accumulated in a Python list. Exhaustive single-token search is
`search_maximal(1, feature)`. featopt is `exhaustive.run` / `greedy.run` end to end (results written),
plus `sweep` alone against a bare batched forward to the same site (the plain HF base model cut after
the site's block, `sweep_throughput.truncated`, as in issue 13's benchmark). Both sides see the same
candidate token ids (the first V of the vocabulary, to keep CPU time sane: the baseline and the
sweeps cost time linear in V) and are asserted to return the same tokens.

    FEATOPT_MODEL_PATH=../shared/models python benchmarks/bench_search.py [--threads 1 --exhaustive-candidates 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter, load_model
from featopt.commands.search import ExhaustiveConfig, GreedyConfig, exhaustive, greedy
from featopt.discrete.objective_scoring import sweep_scorers
from featopt.objectives import Selection, maximize
from featopt.discrete.sweep import AUTO_BATCH, sweep

from sweep_throughput import bare_forward, truncated  # benchmarks/ is on sys.path when run as a script

MODELS = ("gpt2-small-shaped", "smollm2-135m-instruct")
device = "cpu"



def sweep_scorer(adapter: ModelAdapter, site, problems):
    """The sweep's scorer for maximizing `problems` at `site` on one-token inputs: the fast path
    `featopt search exhaustive` takes for a plain maximize (checked to be the fast one)."""
    (found_site, scorer), = sweep_scorers(maximize(Selection(site, problems)).bind(adapter), adapter, 1)
    assert found_site == site, "a plain maximize must take the sweep's fast path"
    return scorer

def gpt2_small_shaped(seed: int) -> ModelAdapter:
    """GPT2Config() defaults (12 layers, d=768, vocab 50257), random weights, no tokenizer."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
    return ModelAdapter(model, None, name="gpt2-small-shaped")


def make_a_model(model, layer: int):
    """The document's `a_model`: the hidden layer's output `[batch, tokens, d]`, from a plain HF forward
    of the whole model (no early exit; `use_cache=False` only spares it building a cache it never uses)."""
    return lambda ids: model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]


@torch.no_grad()
def search_maximal(a_model, vocab_size, n_tokens, feature, batch_size=1000):
    """The document's code line for line; `a_model` and `vocab_size` (the candidate slice) are passed
    in rather than global, and the token ids are returned rather than `tokenizer.decode`d."""
    maximal_tokens = []
    for t in range(n_tokens):
        activations = []
        for i in range(0, vocab_size, batch_size):
            token_batch = torch.tensor([j for j in range(i, min(i + batch_size, vocab_size))])
            token_batch = token_batch.reshape((min(batch_size, vocab_size - i), 1)).to(device)
            maximal_tensor = torch.tensor(maximal_tokens).repeat(min(batch_size, vocab_size - i), 1).to(device)
            if t > 0:
                greedy_tokens = torch.cat((maximal_tensor, token_batch), dim=1).int()
            else:
                greedy_tokens = token_batch
            output = a_model(greedy_tokens)
            activations += output[:, -1, feature].flatten()
        activations = torch.tensor(activations)
        token_int = torch.argmax(activations)
        maximal_tokens.append(token_int)
    return [int(t) for t in maximal_tokens]


def spread(times: list[float]) -> str:
    return f"{min(times):.2f}-{max(times):.2f}s"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bare(adapter: ModelAdapter, site, candidates: torch.Tensor, keep: bool = False):
    """The same batches as the sweep through `adapter.run` to the site, nothing else (`keep`: return
    every activation `[V, width]`, for the correctness check only; the timed baseline is
    `sweep_throughput.bare_forward`, whose output is after the final norm)."""
    size, kept = AUTO_BATCH["cpu"], []
    with torch.inference_mode():
        for i in range(0, len(candidates), size):
            acts = adapter.run([site], input_ids=candidates[i:i + size, None])[site]
            if keep:
                kept.append(acts[:, -1])
    return torch.cat(kept) if keep else None


def bench(adapter: ModelAdapter, layer: int, args, out: str) -> dict:
    name, d = adapter.name, adapter.d_model
    v_e, v_g, fs = args.exhaustive_candidates, args.greedy_candidates, list(range(args.baseline_features))
    a_model = make_a_model(adapter.model, layer)
    site = adapter.site("resid_post", layer)
    cands = torch.arange(v_e)

    def fo_exhaustive(spec):
        config = ExhaustiveConfig(model=name, layer=layer, features=spec, candidates=f"0-{v_e - 1}",
                                             progress=False, out=out)
        return [r.token_ids[-1] for r in exhaustive(config, adapter).results]

    # Warm-up and the all-features reference: every feature's argmax from a bare forward.
    reference = bare(adapter, site, cands, keep=True).argmax(0).tolist()
    cut = truncated(adapter, layer)  # the timed bare forward: the plain HF model cut after the site
    search_maximal(a_model, 8, 1, 0)
    fo_exhaustive("[:, :, 0]")  # featopt's first call in a process is slower (imports, first write)
    # Exhaustive, one feature: the baseline on features 0..k-1 (also its per-feature cost).
    t_base, t_fo1 = [], []
    for f in fs:
        t, (fo_tok,) = timed(lambda: fo_exhaustive(f"[:, :, {f}]"))
        t_fo1.append(t)
        t, base_tok = timed(lambda: search_maximal(a_model, v_e, 1, f))
        t_base.append(t)
        assert base_tok == [fo_tok] == [reference[f]], (
            f"{name} layer {layer} feature {f}: baseline {base_tok}, featopt {fo_tok}, bare forward {reference[f]}")
    # Exhaustive, all d features: featopt end to end, its sweep alone, and the bare forward.
    spec = f"[:, :, 0-{d - 1}]"
    problems = parse_features(spec, n_tokens=1, width=d)
    t_all, t_sweep, t_bare = [], [], []
    for _ in range(args.repeats):
        t, tokens = timed(lambda: fo_exhaustive(spec))
        t_all.append(t)
        assert tokens == reference, f"{name} layer {layer}: all-features sweep differs from the bare forward's argmax"
    scorer = sweep_scorer(adapter, site, problems)  # as `featopt search exhaustive` builds it
    for i in range(args.throughput_repeats):  # cheap, and the noisiest figure: more repeats, order alternated
        for what in ("sweep", "bare") if i % 2 else ("bare", "sweep"):
            if what == "sweep":
                t, topk = timed(lambda: sweep(adapter, [(site, scorer)], candidates=cands, k=10, progress=False))
                t_sweep.append(t)
                assert topk.ids[0].tolist() == reference
            else:
                t_bare.append(timed(lambda: bare_forward(cut, cands, AUTO_BATCH["cpu"]))[0])
    # Greedy, N tokens, last position (the document's variant), feature 0.
    config = GreedyConfig(model=name, layer=layer, features="[:, :, 0]", tokens=args.tokens, variant="last",
                                 candidates=f"0-{v_g - 1}", progress=False, out=out)
    t_greedy = []
    for _ in range(args.repeats):
        t, run = timed(lambda: greedy(config, adapter))
        t_greedy.append(t)
    t_gbase, base_tokens = timed(lambda: search_maximal(a_model, v_g, args.tokens, 0))
    fo_tokens = run.results[0].token_ids
    assert fo_tokens == base_tokens, f"{name} layer {layer} greedy: featopt {fo_tokens} vs baseline {base_tokens}"
    med = statistics.median
    row = dict(model=name, layer=f"{layer}/{adapter.n_layers}", d=d, fo1=med(t_fo1), base1=med(t_base),
               fo_all=med(t_all), base_all=d * med(t_base), sweep=med(t_sweep), bare=med(t_bare),
               frac=med(b / s for b, s in zip(t_bare, t_sweep)), frac_all=med(t_bare) / med(t_all),
               fo_greedy=med(t_greedy), base_greedy=t_gbase)
    full = adapter.vocab_size / v_e  # every cost here is linear in the number of candidates
    print(f"  {name} layer {layer}: exhaustive 1 feature {row['fo1']:.2f}s vs {row['base1']:.2f}s "
          f"(x{row['base1'] / row['fo1']:.1f}; featopt {spread(t_fo1)}, baseline {spread(t_base)}); all {d}: featopt "
          f"{row['fo_all']:.2f}s ({spread(t_all)}), baseline {row['base_all']:.0f}s extrapolated (whole vocabulary: "
          f"featopt's sweep ~{row['sweep'] * full:.0f}s, baseline ~{row['base_all'] * full / 3600:.1f}h); sweep "
          f"{row['sweep']:.2f}s ({spread(t_sweep)}) vs bare {row['bare']:.2f}s ({spread(t_bare)}), throughput "
          f"x{row['frac']:.2f}; greedy N={args.tokens} {row['fo_greedy']:.2f}s ({spread(t_greedy)}) vs "
          f"{t_gbase:.2f}s, tokens {fo_tokens}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exhaustive-candidates", type=int, default=2000, help="first V token ids, exhaustive sweeps")
    p.add_argument("--greedy-candidates", type=int, default=256, help="first V token ids tried at each greedy step")
    p.add_argument("--baseline-features", type=int, default=3, help="features the baseline sweeps (then extrapolated)")
    p.add_argument("--tokens", type=int, default=8, help="greedy N")
    p.add_argument("--repeats", type=int, default=3, help="featopt timings per cell; the median is reported")
    p.add_argument("--throughput-repeats", type=int, default=7, help="sweep vs bare forward timings (median ratio)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: gpt2-small-shaped, load_model names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"fp32 CPU; exhaustive over token ids 0-{args.exhaustive_candidates - 1}, greedy N={args.tokens} over "
          f"0-{args.greedy_candidates - 1}; baseline on {args.baseline_features} features, featopt x{args.repeats}",
          flush=True)
    start, table, skipped = time.perf_counter(), [], []
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
        with tempfile.TemporaryDirectory() as out:
            table += [bench(adapter, layer, args, out) for layer in (0, adapter.n_layers // 2)]
    print(f"\ntotal {time.perf_counter() - start:.0f}s; times in seconds, featopt medians; baseline all-features = "
          "d x its median one-feature time (extrapolated)\n")
    print("| model | layer / blocks | exh. 1 feature: featopt | baseline | ratio | exh. all d features: featopt "
          "| baseline (extrap.) | ratio | sweep / bare forward throughput | bare / `run` end to end "
          f"| greedy N={args.tokens}: featopt | baseline | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['layer']} | {r['fo1']:.2f} | {r['base1']:.2f} | {r['base1'] / r['fo1']:.1f}x "
              f"| {r['fo_all']:.2f} | {r['base_all']:.0f} | {r['base_all'] / r['fo_all']:.0f}x | {r['frac']:.2f} "
              f"| {r['frac_all']:.2f} | {r['fo_greedy']:.2f} | {r['base_greedy']:.2f} "
              f"| {r['base_greedy'] / r['fo_greedy']:.1f}x |")
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
