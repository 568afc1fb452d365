#!/usr/bin/env bash
# Short GPU check of the fused ops (RMSNorm, gated MLP, RoPE, LoRA) and the encode pipeline (under 4 minutes of device
# time):
#
#   here:   python benchmarks/prepare_device.py          # .cache/device: shared data + SmolLM2 tokenizer, ~18 MiB
#   device: run(command="bash benchmarks/gpu_fused.sh", carry=[".cache/device"], timeout_s=215)
#
# bf16 kernel parity (GPU-marked tests), the 1.3B encode benchmark with the fused ops on and off beside the HF
# reference at batch 128 (+ profile), the MNTP training steps (+ profile) and the fused ops against HF's. Same
# outputs as gpu_check.sh.
RUN_NAME=gpu_fused
BUDGET_DEFAULT=195
# shellcheck source=benchmarks/device_common.sh
source "$(dirname "$0")/device_common.sh"

step "pytest -m gpu rms_norm + gated MLP + rope + LoRA + bf16 encode parity" 90 15 \
  $PY -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_rmsnorm.py tests/kernels/test_swiglu.py \
  tests/kernels/test_rope.py tests/kernels/test_lora_project.py tests/llm2vec_fast/training/test_lora.py \
  tests/llm2vec_fast/test_encoder.py::test_gpu_bf16_encode_matches_fp32_reference \
  --junitxml="$WORK/pytest_gpu_fused_kernels.xml"
# (the fused wiring on CUDA: gpu_check.sh runs tests/llm2vec_fast/test_fused.py; here the encode rows' cosine to
# the HF reference covers it)
step "encode llama-1.3b fused vs unfused" 90 60 \
  $PY benchmarks/bench_encode.py --model llama-1.3b --corpus all --peers hf,ours,ours-unfused --batch-sizes 128 \
  --budgets= --profile --tokenizer "$TOKENIZER"
step "training MNTP --quick" 80 40 $PY benchmarks/bench_training.py --quick --only mntp --profile
step "fused ops vs HF" 45 25 $PY benchmarks/bench_fused_ops.py

echo "=== done in $(($(date +%s) - START))s"
cat "$STATUS"
pack
