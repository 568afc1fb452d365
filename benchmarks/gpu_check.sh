#!/usr/bin/env bash
# One-command GPU check for the device machine (see benchmarks/README.md, "GPU check").
#
#   here:   python benchmarks/prepare_device.py          # .cache/device: shared data + SmolLM2 tokenizer, ~18 MiB
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".cache/device"], timeout_s=570)
#
# Steps, in order, each under `timeout` and a shared wall-clock budget (GPU_CHECK_BUDGET seconds, default 500), each
# continuing past a failure of the one before: GPU-marked kernel tests, the fused-op wiring and bf16 encode parity
# tests, training steps (--quick, with a profiled step of the reference and of ours), attention parity + benchmark,
# the 1.3B encode benchmark (both corpora, fused ops on and off, a profile), attention against FlexAttention, then,
# if time is left, the fused elementwise ops against HF's, pooling/CE parity + benchmark,
# the 7B Mistral encode benchmark, causal attention, the 8B MNTP step and the host cost per layer (CPU). First run
# (H200, 2026-11-26): 435 s with the budget at 455.
# Every step writes into $WORK; after every step the results are packed into $OUT, so a run cut short still returns
# what it finished:
#   $OUT/gpu_check.log    everything printed
#   $OUT/summary.md       card, versions, one status line per step, then every result table
#   $OUT/results.tar.gz   all JSON / markdown / PNG / junit files (unpack into benchmarks/results/)
RUN_NAME=gpu_check
BUDGET_DEFAULT=500
# shellcheck source=benchmarks/device_common.sh
source "$(dirname "$0")/device_common.sh"

step "pytest -m gpu tests/kernels" 130 30 \
  $PY -m pytest -m gpu -q -p no:cacheprovider tests/kernels --junitxml="$WORK/pytest_gpu_kernels.xml"
# the fused RMSNorm/gated-MLP wiring on CUDA tensors (real kernels, fp32, whole models with LoRA), the fused LoRA
# (CUDA dropout masks regenerated or drawn in the dropout_project kernels, also under checkpointing; the norm
# rebuild; bf16 autocast against peft) and the bf16 fast
# encode path against the fp32 reference path (per-row cosine >= 0.999), evaluation during training under bf16
# autocast
step "pytest test_fused.py + bf16 encode parity" 90 20 \
  $PY -m pytest -q -p no:cacheprovider tests/llm2vec_fast/test_fused.py \
  tests/llm2vec_fast/test_encoder.py::test_gpu_bf16_encode_matches_fp32_reference \
  tests/llm2vec_fast/training/test_lora.py \
  tests/llm2vec_fast/training/test_monitor.py::test_gpu_evaluation_during_training \
  --junitxml="$WORK/pytest_gpu_fused.xml"
# the training step first among the benchmarks: the fused LoRA, its in-kernel dropout, the norm rebuild and partial
# checkpointing are all unmeasured on a GPU (issue #5's speed and memory targets)
step "training --quick" 185 60 $PY benchmarks/bench_training.py --quick --profile
# encode's host side alone on this machine's CPU (no GPU): can it feed the 1.3B encode at 60 % MFU (~200k tok/s)?
step "host pipeline (CPU)" 40 15 $PY benchmarks/bench_host_pipeline.py --repeats 1 --tokenizer "$TOKENIZER"
step "attention --check --bench --quick" 80 30 \
  $PY benchmarks/bench_attention.py --check --bench --quick --no-flex --tokenizer "$TOKENIZER"
# every path warms up on the whole corpus; the default budget is 64k tokens on an H100/H200, so 128k is the extra one
step "encode llama-1.3b (both corpora)" 200 60 \
  $PY benchmarks/bench_encode.py --model llama-1.3b --corpus all --peers hf,st,ours,ours-unfused --budgets 131072 \
  --profile --tokenizer "$TOKENIZER"
# FlexAttention's compiles took over 90 s on a fresh H200 (2026-11-26): alone, after the steps that must run
step "attention vs FlexAttention --quick" 150 90 \
  $PY benchmarks/bench_attention.py --flex-only --quick --tokenizer "$TOKENIZER"
# the fused RMSNorm / SwiGLU / RoPE kernels against HF's ops, never timed alone yet
step "fused ops vs HF" 75 30 $PY benchmarks/bench_fused_ops.py
# measured on 2026-11-26 (H200); rerun when time is left
step "pooling_ce --check" 45 15 $PY benchmarks/bench_pooling_ce.py --check
step "pooling_ce bench" 60 20 $PY benchmarks/bench_pooling_ce.py
step "encode mistral-7b (wikitext)" 110 70 \
  $PY benchmarks/bench_encode.py --model mistral-7b --corpus wikitext --peers hf,ours --budgets= \
  --tokenizer "$TOKENIZER"
step "attention causal --quick" 60 40 \
  $PY benchmarks/bench_attention.py --causal --quick --no-flex --tokenizer "$TOKENIZER"
# issue #5's second shape, never measured yet: reference (checkpointed) against ours + checkpointing, 8B, vocab 128k
step "training MNTP Llama-3-8B config --quick" 150 100 \
  $PY benchmarks/bench_training.py --quick --only mntp-8b
# local attention (window_size), new since the last run: against full attention and the band-masked SDPA path
step "attention window" 60 30 $PY benchmarks/bench_attention.py --window
# the host cost per decoder layer of the GPU code path on this machine's CPU (kernels stubbed): with the profiles'
# device-busy shares, whether small packs and GradCache's chunks wait for the host
step "host overhead (CPU)" 60 45 $PY benchmarks/bench_host_overhead.py --rounds 1 --steps 10

echo "=== done in $(($(date +%s) - START))s"
cat "$STATUS"
pack
