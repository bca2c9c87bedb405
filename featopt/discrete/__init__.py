"""Discrete searches over real tokens, for any objective: the exhaustive single-token sweep
(`exhaustive`), greedy left-to-right search (`greedy`), GCG (`gcg`) and EPO (`epo`) over N tokens,
and discrete inversion (`inversion`). Batched, in inference mode, with early exit at the deepest
site the objective reads and a fixed prefix's keys/values computed once (`sweep`, `candidates`).
The commands that run them live in `featopt.commands.search` and `featopt.commands.swaps`.
"""
