#!/usr/bin/env bash
# Recipe-sized training evidence on the GPU: the default SmolLM2-135M-Instruct through the LLM2Vec unsupervised
# recipe (MNTP, then SimCSE on the MNTP-merged base), STS-B dev Spearman (all 1,500 pairs) after each stage beside
# the causal and bidirectional baselines. See benchmarks/README.md, "Training evidence on the GPU".
#
# The model's GGUF (94 MB) is over one call's 64 MiB, so it travels in two calls on one warm machine:
#   here:   python benchmarks/prepare_device.py && python benchmarks/prepare_device.py model
#   device: run(command="ls -l .cache/device-model-a", carry=[".cache/device-model-a"], timeout_s=60)
#           run(command="bash benchmarks/gpu_evidence.sh", carry=[".cache/device-model-b", ".cache/device"],
#               timeout_s=590)        # at once: a machine left idle ~30 s is given back, part a with it
#
# Stages, each under a wall-clock cap (training stops and saves at --max-seconds; the recipe's step counts are upper
# bounds), results packed into $OUT after each: training_evidence_gpu_mntp.{json,md,png} (base rows, MNTP rows) and
# training_evidence_gpu_simcse.{json,md,png} (SimCSE curve), plus gpu_evidence.log and summary.md.
RUN_NAME=gpu_evidence
BUDGET_DEFAULT=540
# shellcheck source=benchmarks/device_common.sh
source "$(dirname "$0")/device_common.sh"

PARTS=${MODEL_PARTS_DIR:-$ROOT/.cache}
GGUF_DIR=${GGUF_DIR:-/tmp/llm2vec_fast_gguf}
EVIDENCE_WORK=${EVIDENCE_WORK:-/tmp/llm2vec_fast_evidence_gpu}
MAX_SECONDS=${EVIDENCE_MAX_SECONDS:-150}

echo "=== assemble the default model"
name=$(awk '{print $2}' "$PARTS/device-model-b/SHA256SUMS" 2>/dev/null)
mkdir -p "$GGUF_DIR"
if [ -n "$name" ] && cat "$PARTS/device-model-a/part-a.bin" "$PARTS/device-model-b/part-b.bin" >"$GGUF_DIR/$name" \
  && (cd "$GGUF_DIR" && sha256sum -c "$PARTS/device-model-b/SHA256SUMS"); then
  echo "| assemble $name | ok | 0 | sha256 verified |" >>"$STATUS"
else
  echo "=== the model parts are missing or corrupt: carry .cache/device-model-a in a first call, then this one"
  echo "| assemble model | FAILED | 0 | parts missing or sha256 mismatch |" >>"$STATUS"
  pack
  exit 1
fi
export LLM2VEC_FAST_GGUF=$GGUF_DIR/$name
# transformers reads GGUF through the pure-Python gguf package, carried in part b when the image lacks it
$PY -c "import gguf" 2>/dev/null || export PYTHONPATH="$PARTS/device-model-b/pylib${PYTHONPATH:+:$PYTHONPATH}"
pack

step "convert the default model" 90 30 $PY -c "from llm2vec_fast.models import resolve_model; print(resolve_model(None))"
step "MNTP: recipe 1000 x 32 x 512, lr 5e-5 (capped at ${MAX_SECONDS}s)" 260 90 \
  $PY -m llm2vec_fast.training.evidence --out "$WORK" --work "$EVIDENCE_WORK" --name training_evidence_gpu_mntp \
  --mntp-steps 1000 --mntp-batch 32 --mntp-len 512 --mntp-lr 5e-5 \
  --mntp-files wikitext-2-raw.wiki.test.raw wiki1m_for_simcse.head1280000B.txt --skip-simcse --max-seconds "$MAX_SECONDS"
step "SimCSE: recipe 1000 x 128 x 128, lr 3e-5 (capped at ${MAX_SECONDS}s)" 240 90 \
  $PY -m llm2vec_fast.training.evidence --out "$WORK" --work "$EVIDENCE_WORK" --name training_evidence_gpu_simcse \
  --reuse-mntp --skip-base --no-weighted-baseline --simcse-steps 1000 --simcse-batch 128 --simcse-len 128 \
  --simcse-lr 3e-5 --simcse-eval-every 250 --max-seconds "$MAX_SECONDS"

echo "=== done in $(($(date +%s) - START))s"
cat "$STATUS"
pack
