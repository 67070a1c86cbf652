"""``btpo plan``: per-GPU memory of a run, by component, before it runs.

| module | owns |
|---|---|
| ``estimate`` | the formulas (``docs/plan.md``), per strategy and phase |
| ``shapes`` | model shapes (layers, widths, vocabulary) from shipped JSON or a config |
| ``measure`` | real runs' peaks, to check the estimates (``bench/plan_memory.py``) |
"""
