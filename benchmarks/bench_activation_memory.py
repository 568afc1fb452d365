"""Activation memory of one MNTP training step, by path: bytes autograd keeps for the backward per token per layer.

Runs on the CPU, exactly (an accounting, not a timing): every tensor saved for the backward is seen through
``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage, parameters excluded. Two configs of
issue #5: the 1.3B Llama (MHA 16 x 128, MLP 5504; 32 x 512 tokens, 24 layers) and the Llama-3-8B (GQA 32/8 x 128,
MLP 14336; 16 x 512 tokens, 32 layers). Each layer is measured narrowed to one or two kv heads' worth of its width
(same head dim, GQA ratio and MLP ratio) and extrapolated linearly to the full hidden size. bf16 weights under bf16
autocast, LoRA r 16 on all linear layers with dropout 0.05, our Triton ops run by the interpreter. Dropout keeps a
1-byte mask as on CUDA (torch's CPU dropout keeps a float one). Two layer counts separate the per-layer bytes from the
per-step ones (embeddings, loss).

Paths: peft's LoRA forward on the batch as ``[B, L]`` (the previous "ours"), the same packed into one row, the fused
LoRA, the fused LoRA with the down projection taking the activation inside, and that with the RMSNorm outputs rebuilt
in the backward from the norms' inputs (today's "ours"; the 8B config: the first path and ours). The reference
recipe (HF + SDPA with a padding mask) is not counted here: on CPU its attention keeps the probabilities, on the GPU
the memory-efficient kernel does not, so only a GPU run measures it (``bench_training.py``).

    python benchmarks/bench_activation_memory.py          # ~3 min; writes activation_memory.{json,md}
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAD_DIM = 128
# the two MNTP steps (#5): (query heads, kv heads, MLP width per head) of the full config, its hidden size,
# layers and tokens per step. Each is measured narrowed to `k` kv heads' worth of the layer (k = 1, 2: same head dim,
# GQA ratio and MLP ratio), and the per-layer bytes, linear in the width, are extrapolated to the full hidden size.
SHAPES = {"1.3B": dict(g=1, hkv_full=16, inter_per_hkv=344, layers=24, tokens=32 * 512, widths=(2, 4)),
          "Llama-3-8B": dict(g=4, hkv_full=8, inter_per_hkv=1792, layers=32, tokens=16 * 512, widths=(1, 2))}


def _model(shape, hkv, layers, fused_lora, packed, gated_down, rebuild, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm2vec_fast import fuse_ops, to_bidirectional
    from llm2vec_fast.training.common import add_lora
    from llm2vec_fast.training.mntp import MNTPModel

    torch.manual_seed(seed)
    c = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hkv * c["g"] * HEAD_DIM, intermediate_size=hkv * c["inter_per_hkv"],
                      num_hidden_layers=layers, num_attention_heads=hkv * c["g"], num_key_value_heads=hkv,
                      head_dim=HEAD_DIM, vocab_size=1000)
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
    for shape, c in SHAPES.items():
        full_hidden = c["hkv_full"] * c["g"] * HEAD_DIM
        first = None
        for name, *flags in PATHS:
            if shape != "1.3B" and name not in (PATHS[0][0], PATHS[-1][0]):
                continue  # the 8B shape: the first path and ours only
            per_layer = {}
            for hkv in c["widths"]:
                b1, tokens = _kept_bytes(*_model(shape, hkv, 1, *flags))
                b2, _ = _kept_bytes(*_model(shape, hkv, 2, *flags))
                per_layer[hkv * c["g"] * HEAD_DIM] = (b2 - b1) / tokens  # bytes per token per layer at this width
            (h1, y1), (h2, y2) = sorted(per_layer.items())
            at_full = y1 + (y2 - y1) / (h2 - h1) * (full_hidden - h1)  # linear in the width
            per_h = at_full / full_hidden
            first = first or per_h
            rows.append({"config": shape, "path": name, "bytes_per_token_per_layer_over_hidden": per_h,
                         "gib_at_full_step": at_full * c["tokens"] * c["layers"] / 2**30,
                         "step": f"{c['tokens'] // 512}x512, {c['layers']} layers", "vs_first": per_h / first})
            print(rows[-1], flush=True)
    notes = ("Bytes kept for the backward per token per decoder layer at the full config's hidden size, in units of "
             "that size (bf16 under autocast: 2 = one hidden-wide bf16 tensor); CPU accounting with CUDA-like "
             "dropout masks (bool), measured at two narrowed widths and extrapolated linearly (the rank-16 LoRA "
             "products do not grow with the width). gib_at_full_step: the layers' activations of the config's MNTP "
             "step without checkpointing (weights, optimizer state, the loss and allocator slack come on top). The "
             "GPU run of 2026-11-26 measured 43.5 GB peak for the 1.3B config's first path.")
    out = Path(a.out) if a.out else None
    write_results("activation_memory", rows, out_dir=out, title="Activation memory of an MNTP step, by path",
                  notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
