"""Preference pairs: the canonical format, robust file reading, and the synthetic task.

| module | owns |
|---|---|
| ``pairs`` | ``PairRecord`` (METHOD.md §8), ``read_pairs`` / ``read_split`` with counted skips, ``write_dataset``, atomic writes |
| ``files`` | any bytes → lines: gzip by content, per-line UTF-8, LFS pointers; a named error or a counted skip |
| ``synthetic`` | the built-in arithmetic-judging task (used by ``build-data synthetic`` and the tiny-thinker) |

Importers and builders that read outside formats live in the top-level ``data_builders`` package.
"""
