#!/usr/bin/env bash
# The test suite, what CI runs (after `bash scripts/setup.sh --with-vllm`):
#   1. ruff, then mypy (strict on engines/, training/session.py, losses.py, methods/__init__.py and spec.py:
#      pyproject.toml's [tool.mypy]);
#   2. the main suite in .venv (the locked set, requirements/venv.lock), vLLM-marked tests left out;
#   3. the vLLM-marked tests in .venv-vllm with BTPO_REQUIRE_VLLM=1: there a vLLM test that cannot
#      run FAILS instead of skipping (tests/conftest.py).
# Extra arguments go to both pytest runs (e.g. -x, -k engines).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || { echo "test.sh: .venv-vllm missing; run: bash scripts/setup.sh --with-vllm" >&2; exit 2; }
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q -m "not vllm" "$@"
BTPO_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -q -m vllm "$@"
