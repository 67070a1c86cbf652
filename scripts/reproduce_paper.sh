#!/usr/bin/env bash
# The paper's results table as one resumable pipeline: build HH / IF / Math, train the six methods on
# each with the shipped recipes (recipes/<method>/<backbone>-<dataset>.yaml), evaluate, compare.
#
#   bash scripts/reproduce_paper.sh --backbone qwen2.5-7b --gpus 8            # the real thing
#   bash scripts/reproduce_paper.sh --backbone qwen2.5-7b --dry-run           # every command, in order
#   bash scripts/reproduce_paper.sh --quick                                    # tiny models, CPU, ~2 min
#
# Options:
#   --backbone B     qwen2.5-3b | qwen2.5-7b (default) | llama3.2-3b | llama3.1-8b
#   --gpus N         processes per run (N > 1: `btpo train --gpus N`, which launches the recipe's
#                    hardware.strategy config, recipes/accelerate/<strategy>.yaml); default 1
#   --out DIR        output folder (default: paper-<backbone>, or paper-quick): data/, runs/, logs/, results.*
#   --methods "M.."  a subset of: bt bt-prefilled gram grpo-pair grpo-point btpo (default: all six)
#   --datasets "D.." a subset of: hh if math (default: all three)
#   --dry-run        print every command in order, run nothing
#   --quick          synthetic data named hh/if/math (one seed each: their own columns), tiny-qwen2,
#                    2 steps: end to end on a CPU (default methods "bt btpo", datasets "hh"); with
#                    --gpus 2 each run trains in 2 processes (gloo on a CPU), evaluation in one
#
# One log per step: DIR/logs/<step>.log. A failed step is named with its log, and the script exits with
# the step's exit code. Re-running skips what is done (data with its manifest.json, finished runs, eval
# JSONs) and resumes stopped runs from their last checkpoint: `btpo status` decides (exit 0 finished,
# 3 stopped, 4 running, 5 broken). BTPO (default: btpo) is the command that runs btpo.
set -euo pipefail

BACKBONE=qwen2.5-7b
GPUS=1
OUT=""
DRY=0
QUICK=0
METHODS=""
DATASETS=""
ALL_METHODS="bt bt-prefilled gram grpo-pair grpo-point btpo"
BTPO=${BTPO:-btpo}

die() { echo "reproduce_paper.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --backbone) BACKBONE=${2:?--backbone needs a value}; shift 2 ;;
    --gpus) GPUS=${2:?--gpus needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --methods) METHODS=${2:?--methods needs a value}; shift 2 ;;
    --datasets) DATASETS=${2:?--datasets needs a value}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;   # the header comment
    *) die "unknown option $1 (see --help)" ;;
  esac
done

case "$BACKBONE" in qwen2.5-3b|qwen2.5-7b|llama3.2-3b|llama3.1-8b) ;; *) die "--backbone $BACKBONE: expected qwen2.5-3b, qwen2.5-7b, llama3.2-3b or llama3.1-8b" ;; esac
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus $GPUS: expected a positive number"
if [ "$QUICK" = 1 ]; then
  METHODS=${METHODS:-"bt btpo"}
  DATASETS=${DATASETS:-"hh"}
  TAG=tiny-qwen2
  OUT=${OUT:-paper-quick}
else
  METHODS=${METHODS:-$ALL_METHODS}
  DATASETS=${DATASETS:-"hh if math"}
  TAG=$BACKBONE
  OUT=${OUT:-paper-$BACKBONE}
fi
for m in $METHODS; do [[ " $ALL_METHODS " == *" $m "* ]] || die "--methods: unknown method $m"; done
for d in $DATASETS; do [[ " hh if math " == *" $d "* ]] || die "--datasets: unknown dataset $d"; done

read -r -a BTPO_CMD <<< "$BTPO"
# training: btpo's own launcher (the recipe's strategy, GPUS processes); evaluation: data-parallel processes
GPU_ARGS=(); EVAL=("${BTPO_CMD[@]}")
if [ "$GPUS" -gt 1 ]; then
  GPU_ARGS=(--gpus "$GPUS")
  [ "$QUICK" = 1 ] || EVAL=(accelerate launch --multi_gpu --num_processes "$GPUS" -m btpo_cli)
fi

# quick mode: a few steps of each method on tiny-qwen2 (the settings of tests/conftest.py JUDGE_TRAIN)
ROLLOUT=(--set rollout.batch_size=4 --set train.batch_size=2 --set train.micro_batch_size=1 --set rollout.n=2
         --set rollout.max_new_tokens=8)
quick_args() {
  case "$1" in
    bt) echo --set train.batch_size=8 --set train.micro_batch_size=4 ;;
    bt-prefilled) echo --set train.batch_size=4 --set train.micro_batch_size=2 --set data.max_length=256 \
                       --set prefilled.max_thought_tokens=6 --set prefilled.batch_size=64 ;;
    gram) echo --set train.batch_size=4 --set train.micro_batch_size=2 --set data.max_length=256 ;;
    grpo-pair|grpo-point) echo "${ROLLOUT[@]}" --set data.max_length=256 ;;
    btpo) echo "${ROLLOUT[@]}" --set data.max_length=128 ;;
  esac
}

LOGS="$OUT/logs"
[ "$DRY" = 1 ] || mkdir -p "$LOGS"

# step NAME CMD...: run CMD with its output in LOGS/NAME.log (--dry-run: print it); a failure names the log
step() {
  local name=$1; shift
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  local log="$LOGS/$name.log"
  echo "[reproduce] $name: $*" >&2
  local rc=0
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "[reproduce] step $name failed (exit $rc): see $log" >&2
    tail -n 5 "$log" >&2 || true
    exit "$rc"
  fi
}

skip() { echo "[reproduce] $1: done, skipped" >&2; }

# 1. data
for ds in $DATASETS; do
  data="$OUT/data/$ds"
  if [ "$DRY" = 0 ] && [ -f "$data/manifest.json" ]; then skip "build-data-$ds"; continue; fi
  if [ "$QUICK" = 1 ]; then
    case "$ds" in hh) seed=1 ;; if) seed=2 ;; *) seed=3 ;; esac     # a different set per column
    step "build-data-$ds" "${BTPO_CMD[@]}" build-data synthetic --out "$data" --n-train 32 --n-test 8 \
      --seed "$seed" --name "$ds"
  else
    step "build-data-$ds" "${BTPO_CMD[@]}" build-data "$ds" --out "$data"
  fi
done

# 2. train (fresh, resumed or skipped, as `btpo status` says), 3. eval
for ds in $DATASETS; do
  for m in $METHODS; do
    run="$OUT/runs/$m-$TAG-$ds"
    if [ "$QUICK" = 1 ]; then
      # shellcheck disable=SC2046
      fresh=(train --method "$m" --recipe "$m/tiny-qwen2-synthetic" --data "$OUT/data/$ds" --out "$run" --max-steps 2
             --set optim.lr=1e-3 --set optim.warmup_ratio=0 --set train.save_every=1 $(quick_args "$m"))
    else
      fresh=(train --method "$m" --recipe "recipes/$m/$BACKBONE-$ds.yaml" --data "$OUT/data/$ds" --out "$run")
    fi
    state=new
    if [ "$DRY" = 0 ] && [ -e "$run" ]; then
      rc=0
      row=$("${BTPO_CMD[@]}" status "$run" --format tsv 2>/dev/null | sed -n 2p) || rc=$?
      case "$rc" in
        0) state=finished ;;
        3) state=stopped; at=$(printf '%s\n' "$row" | cut -f3) ;;
        4) echo "[reproduce] $run is being trained by another process (btpo status $run); stopping" >&2; exit 4 ;;
        *) state=new ;;
      esac
    fi
    case "$state" in
      finished) skip "train-$m-$ds" ;;
      stopped)
        if [ "${at:-0}" = 0 ]; then
          step "train-$m-$ds" "${BTPO_CMD[@]}" "${fresh[@]}" ${GPU_ARGS[@]+"${GPU_ARGS[@]}"} --overwrite
        else
          echo "[reproduce] train-$m-$ds: stopped at step $at, resuming" >&2
          step "train-$m-$ds-resume" "${BTPO_CMD[@]}" train --out "$run" --resume ${GPU_ARGS[@]+"${GPU_ARGS[@]}"}
        fi ;;
      new) step "train-$m-$ds" "${BTPO_CMD[@]}" "${fresh[@]}" ${GPU_ARGS[@]+"${GPU_ARGS[@]}"} ;;
    esac
    if [ "$DRY" = 0 ] && compgen -G "$run/eval/*.json" >/dev/null; then skip "eval-$m-$ds"; continue; fi
    if [ "$QUICK" = 1 ]; then
      step "eval-$m-$ds" "${EVAL[@]}" eval --checkpoint "$run" --limit 8 --max-new-tokens 8
    else
      step "eval-$m-$ds" "${EVAL[@]}" eval --checkpoint "$run"
    fi
  done
done

# 4. the table (stdout, DIR/results.md, DIR/results.json) and the figure DIR/results.png (needs matplotlib)
if [ "$DRY" = 1 ]; then
  printf '%q ' "${BTPO_CMD[@]}" compare "$OUT/runs" --plot "$OUT/results.png"; echo
  exit 0
fi
for fmt in json markdown; do
  ext=$fmt; [ "$fmt" = markdown ] && ext=md
  rc=0
  "${BTPO_CMD[@]}" compare "$OUT/runs" --format "$fmt" >"$OUT/results.$ext" 2>"$LOGS/compare-$fmt.log" || rc=$?
  [ "$rc" = 0 ] || { echo "[reproduce] step compare failed (exit $rc): see $LOGS/compare-$fmt.log" >&2; exit "$rc"; }
done
if ! "${BTPO_CMD[@]}" compare "$OUT/runs" --plot "$OUT/results.png" 2>"$LOGS/compare-plot.log"; then
  echo "[reproduce] no figure (see $LOGS/compare-plot.log); the table:" >&2
  cat "$OUT/results.md"
fi
echo "[reproduce] done: $OUT/results.md, $OUT/results.json" >&2
