"""Discrete searches over the vocabulary (source document 000): the exhaustive single-token sweep
and the greedy left-to-right search, both batched, cached and early-exiting at the site.

`exhaustive.run(ExhaustiveConfig(...))` and `greedy.run(GreedyConfig(...))` are the entry points;
`sweep.sweep` is the batched pass they share.
"""

from featopt.discrete.common import SearchRun, format_table
from featopt.discrete.exhaustive import ExhaustiveConfig
from featopt.discrete.greedy import GreedyConfig
from featopt.discrete.scoring import Scorer, TopK, merge_topk
from featopt.discrete.sweep import sweep

__all__ = ["ExhaustiveConfig", "GreedyConfig", "SearchRun", "Scorer", "TopK", "format_table", "merge_topk", "sweep"]
