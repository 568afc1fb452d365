#!/usr/bin/env bash
# One-command GPU check for the device machine (see benchmarks/README.md, "GPU check").
#
#   here:   python benchmarks/prepare_device.py          # .cache/device: shared data + SmolLM2 tokenizer, ~18 MiB
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".cache/device"], timeout_s=540)
#
# Steps, in order, each under `timeout` and a shared wall-clock budget (GPU_CHECK_BUDGET seconds, default 450), each
# continuing past a failure of the one before: GPU-marked kernel tests, attention parity + benchmark, pooling/CE
# parity + benchmark, encode benchmark (1.3B Llama config, both corpora), training steps (--quick), then the 7B
# Mistral encode benchmark on one corpus if time is left. Every step writes into $WORK; after every step the
# results are packed into $OUT, so a run cut short still returns what it finished:
#   $OUT/gpu_check.log    everything printed
#   $OUT/summary.md       card, versions, one status line per step, then every result table
#   $OUT/results.tar.gz   all JSON / markdown / PNG / junit files (unpack into benchmarks/results/)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
STATUS=$WORK/status.txt
NSTEP=0
: >"$STATUS"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LLM2VEC_FAST_SHARED=${LLM2VEC_FAST_SHARED:-$ROOT/.cache/device/shared}
export LLM2VEC_FAST_CACHE=${LLM2VEC_FAST_CACHE:-/tmp/llm2vec_fast_cache}
TOKENIZER=$ROOT/.cache/device/smollm2

pack() {
  {
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
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

step "pytest -m gpu tests/kernels" 100 30 \
  $PY -m pytest -m gpu -q -p no:cacheprovider tests/kernels --junitxml="$WORK/pytest_gpu_kernels.xml"
step "attention --check --bench --quick" 110 30 \
  $PY benchmarks/bench_attention.py --check --bench --quick --tokenizer "$TOKENIZER"
step "pooling_ce --check" 45 15 $PY benchmarks/bench_pooling_ce.py --check
step "pooling_ce bench" 60 20 $PY benchmarks/bench_pooling_ce.py
step "encode llama-1.3b (both corpora)" 180 60 \
  $PY benchmarks/bench_encode.py --model llama-1.3b --corpus all --tokenizer "$TOKENIZER"
step "training --quick" 150 60 $PY benchmarks/bench_training.py --quick
step "encode mistral-7b (wikitext)" 110 70 \
  $PY benchmarks/bench_encode.py --model mistral-7b --corpus wikitext --peers hf,ours --budgets 65536 \
  --tokenizer "$TOKENIZER"
step "attention causal --quick" 60 40 \
  $PY benchmarks/bench_attention.py --causal --quick --no-flex --tokenizer "$TOKENIZER"

echo "=== done in $(($(date +%s) - START))s"
cat "$STATUS"
pack
