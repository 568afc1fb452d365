"""Activation memory of one MNTP training step, by path: bytes autograd keeps for the backward per token per layer.

Runs on the CPU, exactly (an accounting, not a timing): every tensor saved for the backward is seen through
``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage, parameters excluded. The model is the
1.3B Llama config's layer narrowed to 2 heads (hidden 256 = 2 x 128, MLP 688: the same head dim and MLP ratio, so
every per-token term scales with the hidden size), bf16 weights under bf16 autocast, LoRA r 16 on all linear layers
with dropout 0.05, our Triton ops run by the interpreter. Dropout keeps a 1-byte mask as on CUDA (torch's CPU dropout
keeps a float one). Two layer counts separate the per-layer bytes from the per-step ones (embeddings, loss).

Paths: peft's LoRA forward on the batch as ``[B, L]`` (the previous "ours"), the same packed into one row, the fused
LoRA, the fused LoRA with the down projection taking the activation inside, and that with the RMSNorm outputs rebuilt
in the backward from the norms' inputs (today's "ours"). The reference
recipe (HF + SDPA with a padding mask) is not counted here: on CPU its attention keeps the probabilities, on the GPU
the memory-efficient kernel does not, so only a GPU run measures it (``bench_training.py``).

    python benchmarks/bench_activation_memory.py          # ~30 s; writes activation_memory.{json,md}
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTER, HEADS, HEAD_DIM = 256, 688, 2, 128
FULL = {"hidden": 2048, "layers": 24, "tokens": 32 * 512}  # the 1.3B config's MNTP step (issue #5)


def _model(layers, fused_lora, packed, gated_down, rebuild, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm2vec_fast import fuse_ops, to_bidirectional
    from llm2vec_fast.training.common import add_lora
    from llm2vec_fast.training.mntp import MNTPModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, head_dim=HEAD_DIM, vocab_size=1000)
    lm = LlamaForCausalLM(cfg).to(torch.bfloat16)
    to_bidirectional(lm, "triton")
    fuse_ops(lm, backend="triton")
    backbone = add_lora(lm.get_decoder(), fused=fused_lora)
    model = MNTPModel(backbone, lm.get_output_embeddings(), packed=packed)
    return model.train(), gated_down, rebuild


def _kept_bytes(model, gated_down, rebuild, batch=2, length=64):
    import llm2vec_fast.lora as lora_mod

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (batch, length), generator=g)
    labels = torch.where(torch.rand(batch, length, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    real_dropout = torch.nn.functional.dropout
    real_gated = lora_mod.lora_gated_down

    def cuda_like_dropout(x, p=0.5, training=True, inplace=False):
        # what CUDA's fused dropout keeps: a bool mask (torch's CPU path keeps float noise)
        return torch.native_dropout(x, p, training)[0] if training and p > 0 else x

    torch.nn.functional.dropout = cuda_like_dropout
    lora_mod.KEEP_MASK_ON_CPU, keep_before = False, lora_mod.KEEP_MASK_ON_CPU  # regenerate, as on CUDA
    lora_mod.RECOMPUTE_NORM_OUTPUTS, rebuild_before = rebuild, lora_mod.RECOMPUTE_NORM_OUTPUTS
    if not gated_down:
        lora_mod.lora_gated_down = lambda *a: None
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = lora_mod.kept_bytes(lambda: model(input_ids=ids, labels=labels)["loss"], model)
    finally:
        torch.nn.functional.dropout = real_dropout
        lora_mod.KEEP_MASK_ON_CPU = keep_before
        lora_mod.RECOMPUTE_NORM_OUTPUTS = rebuild_before
        lora_mod.lora_gated_down = real_gated
    return kept, batch * length


PATHS = [("peft LoRA, [B, L] batch", False, False, False, False),
         ("peft LoRA, packed", False, True, False, False),
         ("fused LoRA, packed", True, True, False, False),
         ("fused LoRA + down projection, packed", True, True, True, False),
         ("fused LoRA + down projection + norm outputs rebuilt, packed (ours)", True, True, True, True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results or $OUT)")
    a = p.parse_args(argv)
    from benchmarks.common import write_results

    rows = []
    for name, *flags in PATHS:
        b1, tokens = _kept_bytes(*_model(1, *flags))
        b2, _ = _kept_bytes(*_model(2, *flags))
        per_layer = (b2 - b1) / tokens  # bytes per token per layer
        per_step = (b1 - (b2 - b1)) / tokens
        full = per_layer / HIDDEN * FULL["hidden"] * FULL["tokens"] * FULL["layers"] / 2**30
        rows.append({"path": name, "bytes_per_token_per_layer_over_hidden": per_layer / HIDDEN,
                     "per_step_bytes_per_token_over_hidden": per_step / HIDDEN, "gib_at_1.3b_32x512": full})
        print(rows[-1], flush=True)
    base = rows[0]["bytes_per_token_per_layer_over_hidden"]
    for r in rows:
        r["vs_first"] = r["bytes_per_token_per_layer_over_hidden"] / base
    notes = ("Bytes kept for the backward per token per decoder layer, in units of the hidden size (bf16 under "
             "autocast: 2 = one hidden-wide bf16 tensor); CPU accounting with CUDA-like dropout masks (bool). "
             "gib_at_1.3b_32x512: that figure x 2048 x 32 x 512 tokens x 24 layers, the layers' activations of the "
             "1.3B config's MNTP step without checkpointing (weights, optimizer state, the loss and allocator "
             "slack come on top). The GPU run of 2026-11-26 measured 43.5 GB peak for the first path.")
    out = Path(a.out) if a.out else None
    write_results("activation_memory", rows, out_dir=out, title="Activation memory of an MNTP step, by path",
                  notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
