"""Collect eval results from run folders into the paper's results table (Appendix B).

Layout: one row per backbone (``model``) × ``method`` — methods in the order of
:func:`method_order` (the method registry), unknown methods after them alphabetically — and one column per dataset,
plus an ``avg`` column. Figures are accuracies in percent (METHOD.md §7).

Rules (also in ``btpo compare --help``):

- **Shown figure.** The clipped accuracy (``max(raw, 50)``) by default; where a run was clipped the
  raw figure follows in brackets, ``50.0 [43.2]``. ``show="raw"`` shows the raw accuracy instead,
  and then ranks, averages and deltas use the raw figures.
- **Seeds.** Several runs with the same (model, method, dataset), e.g. seeds, make one cell: the
  mean over the runs of each run's figure (each run is clipped on its own before averaging), ± the
  sample standard deviation (ddof = 1), and ``n=K`` the number of runs. One run: no ± and no n.
- **avg.** Per backbone block, the mean of a row's cell means over the datasets that every row of
  that block has; datasets only some rows have are left out of every row's avg, so the column
  compares like with like within a block. The datasets used are listed per model (``avg_datasets``).
  No ± on avg.
- **Best.** Per backbone block (as the paper marks the best method for each model) and per column
  (avg included), the highest shown figure, compared at the displayed precision (one decimal),
  so ties are all marked. Marked only where at least two rows of the block have a figure.
  Markdown: bold; rich table: bold green with a trailing ``*``; csv: ``<ds>_best``; json: ``best``.
- **Delta to BT.** For every non-BT row, shown figure minus the BT row of the same backbone and
  dataset (percentage points, ``(+3.2)``), when that BT cell exists. BT is the baseline because its
  ``MethodSpec`` says ``compare_baseline=True`` (:func:`baseline_method`).
- **What is left out, and said so.** Eval files whose ``eval_version`` differs from this version
  of btpo's (:data:`btpo_cli.judging.protocol.EVAL_VERSION`) are never mixed in: they are listed as
  skipped, as are invalid JSON, empty evals and folders that are not run folders. A run folder
  with no usable eval is listed as not evaluated. A folder that is not a run folder but holds run
  folders (``runs/``) is expanded one level.
- **Stale evals.** An eval whose model or data changed since it ran (:func:`btpo_cli.runs.provenance.staleness`:
  a resumed or overwritten run, a replaced dataset) is left out of the table and listed in ``stale``
  with its reason; ``include_stale`` keeps it, its cell marked ``‡`` (json: ``stale``, csv: ``stale``).
- **Eval settings that differ.** Within a backbone block, rows (or the runs of one row) whose evals
  ran with different settings that move a judge's figure — thought budget, engine and each method's
  own ``eval_settings`` (BTPO: sampled thoughts, ``yes_no_normalize``), every key an eval recorded
  (:func:`eval_settings_of`) — get a warning naming the values and
  rows, and the rows are marked ``†`` (csv/json: ``settings_differ``). Settings a method does not
  read (a BT row's engine) are not compared.

Modules: :mod:`~btpo_cli.compare.table` (collecting and the table), :mod:`~btpo_cli.compare.formats`
(Markdown, rich, JSON, CSV), :mod:`~btpo_cli.compare.skips` (the skip report),
:mod:`~btpo_cli.compare.figure` (the plot); their public names are importable from here.
"""

from btpo_cli.compare.figure import PlotDependencyMissing, _band, plot, plot_panels
from btpo_cli.compare.formats import cell_text, csv_columns, legend, to_csv, to_json, to_markdown, to_rich
from btpo_cli.compare.skips import SKIP_COLUMNS, collect_skips, format_skips, skips_rows
from btpo_cli.compare.table import (
    DIFFER_MARK,
    NOT_COMPARED,
    SHOW,
    STALE_MARK,
    Cell,
    Collected,
    RunEvals,
    Table,
    TableRow,
    baseline_method,
    build_table,
    collect,
    eval_settings_of,
    method_label,
    method_order,
    method_rank,
    row_label,
    summary_problem,
)

__all__ = [
    "DIFFER_MARK", "NOT_COMPARED", "SHOW", "SKIP_COLUMNS", "STALE_MARK", "Cell", "Collected",
    "PlotDependencyMissing", "RunEvals", "Table", "TableRow", "_band", "baseline_method", "build_table",
    "cell_text", "collect", "collect_skips", "csv_columns", "eval_settings_of", "format_skips", "legend",
    "method_label", "method_order", "method_rank", "plot", "plot_panels", "row_label", "skips_rows",
    "summary_problem", "to_csv", "to_json", "to_markdown", "to_rich",
]
