#!/usr/bin/env bash
# Shared by the device scripts (gpu_check.sh, gpu_evidence.sh): sourced after setting RUN_NAME (log and folder
# names) and optionally BUDGET_DEFAULT (seconds). Provides $PY, $WORK (where steps write), $OUT (what comes back),
# $TOKENIZER, pack (summary.md + results.tar.gz into $OUT) and step NAME MAX MIN CMD... (see below), installs the
# project and records card and versions in $WORK/env.txt.
: "${RUN_NAME:?set RUN_NAME before sourcing device_common.sh}"
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-${BUDGET_DEFAULT:-450}}
OUT=${OUT:-$ROOT/${RUN_NAME}_out}
WORK=${GPU_CHECK_WORK:-/tmp/${RUN_NAME}_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/$RUN_NAME.log
STATUS=$WORK/status.txt
NSTEP=0
: >"$STATUS"
exec > >(tee -a "$LOG") 2>&1

# TOKENIZERS_PARALLELISM is left at its default (the Rust tokenizer uses every core, as for a user): the first
# run set it to false, which made every path's tokenization single-threaded
export PYTHONUNBUFFERED=1
export LLM2VEC_FAST_SHARED=${LLM2VEC_FAST_SHARED:-$ROOT/.cache/device/shared}
export LLM2VEC_FAST_CACHE=${LLM2VEC_FAST_CACHE:-/tmp/llm2vec_fast_cache}
TOKENIZER=$ROOT/.cache/device/smollm2

pack() {
  {
    echo "# $RUN_NAME $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    cat "$WORK/env.txt" 2>/dev/null
    echo
    echo "| step | status | seconds | last line |"
    echo "|---|---|---|---|"
    cat "$STATUS"
    for f in "$WORK"/*.md; do
      [ -e "$f" ] || continue
      echo
      cat "$f"
    done
  } >"$OUT/summary.md"
  tar czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null
}

# step NAME MAX_SECONDS MIN_SECONDS CMD...: runs CMD under timeout min(MAX, budget left); skipped below MIN
step() {
  local name=$1 max=$2 min=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt "$min" ]; then
    echo "=== $name: SKIPPED (${left}s of the budget left, needs ${min}s)"
    echo "| $name | skipped: budget | 0 | |" >>"$STATUS"
    pack
    return
  fi
  local limit=$((left < max ? left : max))
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc steplog=$WORK/step_$((++NSTEP)).log
  t0=$(date +%s)
  OUT=$WORK timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$steplog"
  rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t0)) verdict last
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMEOUT (${limit}s)" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  # the step's last words (pytest's tally, PASS/FAIL lines) go into the summary table
  last=$(grep -v '^[[:space:]]*$' "$steplog" | tail -n 1 | tr '|' '/' | cut -c1-160)
  echo "=== $name: $verdict in ${dt}s"
  echo "| $name | $verdict | $dt | $last |" >>"$STATUS"
  pack
}

echo "=== setup"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed"
$PY - >"$WORK/env.txt" <<'EOF'
import importlib.metadata as md, platform, torch
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "—"
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"{card} · python {platform.python_version()} · torch {torch.__version__} · triton {v('triton')} · "
      f"transformers {v('transformers')} · peft {v('peft')} · sentence-transformers {v('sentence-transformers')} · "
      f"llm2vec_fast {v('llm2vec_fast')}")
EOF
cat "$WORK/env.txt"
[ -f "$TOKENIZER/tokenizer.json" ] || echo "WARNING: $TOKENIZER missing: run benchmarks/prepare_device.py here first"
pack

