"""Discrete searches over the vocabulary (source document 000): the exhaustive single-token sweep
and the greedy left-to-right search, both batched, cached and early-exiting at the site.

`exhaustive.run(ExhaustiveConfig(...))` and `greedy.run(GreedyConfig(...))` are the entry points;
`sweep.sweep` is the batched pass they share.
"""

from featopt.search.common import SearchRun, format_table
from featopt.search.exhaustive import ExhaustiveConfig
from featopt.search.greedy import GreedyConfig
from featopt.search.scoring import Scorer, TopK, merge_topk
from featopt.search.sweep import sweep

__all__ = ["ExhaustiveConfig", "GreedyConfig", "SearchRun", "Scorer", "TopK", "format_table", "merge_topk", "sweep"]
