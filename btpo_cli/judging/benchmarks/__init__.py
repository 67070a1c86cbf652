"""The field's judge benchmarks as one registry: a reader per published layout and its official aggregate.

A benchmark is one module in this package ending with :func:`register_benchmark`: it turns one
published record into a :class:`BenchItem` (a prompt, its chosen and rejected responses, a subset),
raising :class:`~btpo_cli.data.pairs.RecordSkip` for a record it cannot use (counted by reason), and
computes its authors' aggregate from the per-item :class:`Outcome` s. Adding a benchmark = one file
+ its import at the bottom of this module.

How a judge meets an item (:func:`judge_items`):

- a **pointwise** judge (BT, BT-prefilled, BTPO's p(Yes), GRPO-point) scores every response once;
  every chosen × rejected comparison and every best-of-N reads those scores;
- a **pairwise** judge (GRAM, GRPO-pair) judges every chosen × rejected pair the benchmark needs in
  both orders (``mode="pairs"``), or, for a ranking benchmark (``mode="ranking"``, RewardBench 2),
  plays every pair of candidates (both orders) and ranks them by mean win probability
  (:meth:`Judge.rank`), which then stands in for the score.

This module stays torch-free (``btpo eval --help`` reads the names).
"""

from btpo_cli.judging.benchmarks import judgebench, rewardbench, rewardbench2, rmb, rmbench  # noqa: F401 - they register
from btpo_cli.judging.benchmarks.base import (
    BenchItem,
    Benchmark,
    Outcome,
    benchmark_names,
    get_benchmark,
    judge_items,
    position_bias,
    read_benchmark,
    register_benchmark,
)
from btpo_cli.judging.protocol import order_bias

__all__ = ["BenchItem", "Benchmark", "Outcome", "benchmark_names", "get_benchmark", "judge_items", "order_bias",
           "position_bias", "read_benchmark", "register_benchmark"]
