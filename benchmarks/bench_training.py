"""Training-step benchmark (GPU only): the original LLM2Vec recipe's path against ours, peers in the same run.

MNTP: LlamaForCausalLM + peft LoRA (r 16, all linear layers), bidirectional SDPA with a padding mask,
full-vocabulary logits for every position, gradient checkpointing (the reference) vs ours: bidirectional Triton
attention on the batch packed into one row, LoRA on the base model through llm2vec_fast.lora (peft's adapter,
leaner forward and backward), masked rows only through the fused linear cross-entropy (with and without
checkpointing, and once with peft's own LoRA forward to measure the fused LoRA's share). SimCSE: two padded passes
with attention dropout 0.3, mean pooling over the padding mask, checkpointing (the reference) vs ours: one packed
pass over both views (Triton attention with dropout, masked-pool kernel), plain and with GradCache (chunks of 64
texts) to report its overhead.

Configs: 1.3B Llama (hidden 2048, 24 layers, 16 heads, MLP 5504, vocab 49152), MNTP batch 32 × 512 and SimCSE batch
128 × 128 (lengths uniform in [16, 128]); ``--full`` adds the Llama-3-8B config (vocab 128,256) MNTP batch 16 × 512.
Random weights, bf16 with autocast, AdamW on the LoRA weights. tokens/s counts real tokens (both SimCSE views).

    python benchmarks/bench_training.py            # ~5 min on an H100
    python benchmarks/bench_training.py --quick    # ~2 min: fewer steps
Results: benchmarks/results/training_steps.{json,md} (or $OUT).
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_1B3 = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=5504, vocab_size=49152)
# --smoke: a tiny config on the CPU, only to check that the script runs end to end
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=300)
DEV = "cuda"
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256)


def build(cfg_kw, causal_lm=True, attention_dropout=0.0, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(**cfg_kw, max_position_embeddings=4096, attention_dropout=attention_dropout,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = (LlamaForCausalLM if causal_lm else LlamaModel)(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def lora(model, causal=False):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                            task_type="CAUSAL_LM" if causal else None))


def checkpointing(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from llm2vec_fast.training.common import hf_checkpointing_enable

    hf_checkpointing_enable(base)
    base.config.use_cache = False


def bidir_sdpa(model):
    """The original's bidirectional path: SDPA with a (padding) mask and is_causal off."""
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False


def padding_mask_4d(keep):
    """[B, L] bool → [B, 1, L, L] bool (True = attend): keys masked, every query row attends (no causal part)."""
    b, length = keep.shape
    return keep[:, None, None, :].expand(b, 1, length, length)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    _sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    return statistics.median(times), mem


def train_step(params, loss_fn):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            loss = loss_fn()
        if loss is not None:  # GradCache back-propagates inside loss_fn and returns None
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mntp_batch(batch, length, vocab, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), device=DEV, generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, length, device=DEV, generator=g) >= 0.2] = -100
    masked = ids.clone()
    masked[labels != -100] = 0
    return masked, labels


def bench_mntp(name, cfg_kw, batch, length, warmup, steps, variants, on_row=print):
    import torch.nn.functional as F

    import llm2vec_fast.lora as lora_mod
    from llm2vec_fast import fuse_ops, to_bidirectional
    from llm2vec_fast.training.common import add_lora, enable_checkpointing
    from llm2vec_fast.training.mntp import MNTPModel

    ids, labels = mntp_batch(batch, length, cfg_kw["vocab_size"])
    tokens = batch * length
    rows = []
    for variant in variants:
        model = build(cfg_kw)
        # the fused LoRA's dropout inside the rank-r product ("auto": on CUDA), or torch's dropout (the ablation)
        lora_mod.DROPOUT_KERNEL = "off" if "torch's LoRA dropout" in variant else "auto"
        if variant == "reference (HF+peft, SDPA padding mask, full logits, ckpt)":
            bidir_sdpa(model)
            model = lora(model, causal=True)
            checkpointing(model)
            mask = padding_mask_4d(torch.ones(batch, length, dtype=torch.bool, device=DEV))

            def loss_fn(model=model, mask=mask):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1))
        else:
            to_bidirectional(model, "auto")
            if "unfused" not in variant:
                fuse_ops(model)
            backbone = add_lora(model.get_decoder(), fused="peft's LoRA" not in variant)
            if "ckpt" in variant:
                # "ours + ckpt": every layer; "ours + ckpt 2/3 of layers": the first two thirds
                frac = re.search(r"ckpt (\d+)/(\d+)", variant)
                enable_checkpointing(backbone, int(frac[1]) / int(frac[2]) if frac else True)
            mntp = MNTPModel(backbone, model.get_output_embeddings())

            def loss_fn(mntp=mntp):
                return mntp(input_ids=ids, labels=labels)["loss"]
        rows.append(_measure(model, loss_fn, f"MNTP {name} {batch}x{length}", variant, tokens, warmup, steps))
        on_row(rows[-1])
        del model, loss_fn
        gc.collect()
        torch.cuda.empty_cache()
    lora_mod.DROPOUT_KERNEL = "auto"
    return rows


# set by --profile: after timing, the reference and "ours" (no checkpointing) run one more step under torch.profiler
PROFILE = {"on": False, "kernels": [], "classes": [], "notes": []}


def _measure(model, loss_fn, step, variant, tokens, warmup, steps):
    """One result row: tokens/s, step time and peak memory of training ``loss_fn`` (an OOM is a row too)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        fn = train_step(params, loss_fn)
        sec, mem = time_steps(fn, warmup, steps)
        # the GradCache step too: it ran at a third of the plain step's speed on the H200, where a quarter more work
        # was expected; its device-busy share tells whether the host (small chunks, many launches) is the limit
        if PROFILE["on"] and (variant.startswith(("reference", "ours (", "ours + GradCache"))):
            profile_step(fn, step, variant)
        return {"step": step, "path": variant, "tokens_per_s": tokens / sec, "step_ms": 1e3 * sec,
                "peak_mem_gb": mem}
    except torch.cuda.OutOfMemoryError:
        return {"step": step, "path": variant, "tokens_per_s": None, "step_ms": None, "peak_mem_gb": "OOM"}


def profile_step(fn, step, variant, top=10):
    """One training step under torch.profiler: its top kernels and where the device time goes, by kernel class."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import profile_breakdown

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    _sync()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync()
    wall = time.perf_counter() - t
    short = variant.split(" (")[0]
    rows, classes, busy = profile_breakdown(prof, wall, top, step=step, path=short)
    PROFILE["kernels"] += rows
    PROFILE["classes"] += classes
    PROFILE["notes"].append(f"{step}, {short}: wall {wall * 1e3:.0f} ms under the profiler, device busy "
                            f"{busy * 1e3:.0f} ms ({busy / wall:.0%})." if wall else "")
    print(PROFILE["notes"][-1], flush=True)


def simcse_lengths(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, length + 1, (batch,), generator=g)


def bench_simcse(name, cfg_kw, batch, length, warmup, steps, variants, chunk=64, on_row=print):
    from llm2vec_fast.kernels.attention import prime_seq_info
    from llm2vec_fast.kernels.pooling import prime_pool_args

    from llm2vec_fast import fuse_ops, to_bidirectional
    from llm2vec_fast.bidirectional import set_attention_dropout
    from llm2vec_fast.encoder import pack, pool
    from llm2vec_fast.training.common import add_lora
    from llm2vec_fast.training.gradcache import grad_cache_step
    from llm2vec_fast.training.losses import simcse_loss

    lens = simcse_lengths(batch, length)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, cfg_kw["vocab_size"], (int(n),), generator=g).int().numpy() for n in lens]
    tokens = 2 * int(lens.sum())
    # padded batch for the reference: right padding to the longest
    pad_ids = torch.zeros(batch, int(lens.max()), dtype=torch.long)
    keep = torch.zeros(batch, int(lens.max()), dtype=torch.bool)
    for i, s in enumerate(seqs):
        pad_ids[i, :len(s)] = torch.from_numpy(s).long()
        keep[i, :len(s)] = True
    pad_ids, keep = pad_ids.to(DEV), keep.to(DEV)
    rows = []
    for variant in variants:
        model = build(cfg_kw, causal_lm=False, attention_dropout=0.3)
        if variant.startswith("reference"):
            bidir_sdpa(model)
            model = lora(model)
            checkpointing(model)
            mask = padding_mask_4d(keep)

            def embed(model=model, mask=mask):
                h = model(input_ids=pad_ids, attention_mask=mask, use_cache=False).last_hidden_state
                w = keep[..., None].to(h.dtype)
                return (h * w).sum(1) / w.sum(1)

            def loss_fn(embed=embed):
                return simcse_loss(embed(), embed())  # two passes, two dropout draws
        else:
            to_bidirectional(model, "auto")
            if "unfused" not in variant:
                fuse_ops(model)
            set_attention_dropout(model, 0.3)
            model = add_lora(model, fused="peft's LoRA" not in variant)

            def encode(idx, model=model):
                f = pack([seqs[i % batch] for i in idx], [0] * len(idx))
                f = {k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in f.items()}
                cu, m = f["cu_seqlens"], f["max_seqlen"]
                # as LLM2Vec.hidden_states does: no sync per forward or pooling
                prime_seq_info(cu, f["cu_seqlens_host"], m)
                prime_pool_args(cu, f["pool_start"], f["cu_seqlens_host"], f["pool_start_host"])
                h = model(input_ids=f["input_ids"][None], position_ids=f["position_ids"][None], cu_seq_lens_q=cu,
                          cu_seq_lens_k=cu, max_length_q=m, max_length_k=m, use_cache=False).last_hidden_state[0]
                return pool(h, cu, "mean", f["pool_start"])

            both = list(range(2 * batch))

            def split_loss(reps, batch=batch):
                return simcse_loss(reps[:batch], reps[batch:])

            if "GradCache" in variant:
                def loss_fn(encode=encode, both=both):
                    grad_cache_step(encode, split_loss, both, chunk, device=torch.device(DEV))
                    return None
            else:
                def loss_fn(encode=encode, both=both):
                    return split_loss(encode(both))  # one packed pass over both views
        rows.append(_measure(model, loss_fn, f"SimCSE {name} {batch}x{length}", variant, tokens, warmup, steps))
        on_row(rows[-1])
        del model, loss_fn
        gc.collect()
        torch.cuda.empty_cache()
    return rows


MNTP_VARIANTS = ["reference (HF+peft, SDPA padding mask, full logits, ckpt)",
                 "ours (Triton attn, fused norm/SwiGLU, fused LoRA, masked-row fused CE)", "ours + ckpt",
                 "ours + ckpt 1/2 of layers", "ours + ckpt 2/3 of layers", "ours with torch's LoRA dropout",
                 "ours with peft's LoRA forward"]
SIMCSE_VARIANTS = ["reference (HF+peft, SDPA padding mask, 2 passes, dropout 0.3, ckpt)",
                   "ours (packed Triton attn + dropout, fused norm/SwiGLU, fused LoRA, one pass, masked pool)",
                   "ours + GradCache (chunks of 64)"]


def add_ratios(rows):
    ref = {}
    for r in rows:
        if r["path"].startswith("reference") and r["tokens_per_s"]:
            ref[r["step"]] = r
    for r in rows:
        base = ref.get(r["step"])
        ok = base is not None and r["tokens_per_s"]
        r["speedup_vs_ref"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
        r["mem_vs_ref"] = r["peak_mem_gb"] / base["peak_mem_gb"] if ok else None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timed steps (~2 minutes on an H100)")
    p.add_argument("--full", action="store_true", help="also the Llama-3-8B config MNTP (16 x 512)")
    p.add_argument("--only", choices=["mntp", "simcse", "mntp-8b"], default=None,
                   help="one benchmark; mntp-8b: the Llama-3-8B config MNTP alone, written to training_steps_8b")
    p.add_argument("--profile", action="store_true",
                   help="one more step of the reference and of ours under torch.profiler: device time by kernel "
                        "class and the top kernels (training_profile.{json,md})")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU: checks the script, times nothing "
                                                        "meaningful, writes no results")
    a = p.parse_args(argv)
    global DEV
    PROFILE["on"] = a.profile
    if a.smoke:
        DEV = "cpu"
        rows = bench_mntp("tiny", TINY, 4, 32, 1, 1, MNTP_VARIANTS)
        rows += bench_simcse("tiny", TINY, 6, 16, 1, 1, SIMCSE_VARIANTS, chunk=4)
        print(add_ratios(rows))
        return 0
    if not torch.cuda.is_available():
        print("bench_training.py needs a CUDA GPU (it times bf16 training steps of 1.3B+ models); nothing to do on "
              "this machine.", file=sys.stderr)
        return 2
    from benchmarks.common import write_results

    warmup, steps = (1, 2) if a.quick else (3, 10)
    notes = ("Random-weight Llama configs, bf16 autocast, AdamW on LoRA (r 16, all linear layers) weights; median "
             f"of {steps} steps after {warmup} warm-up; peak_mem_gb is torch.cuda.max_memory_allocated in GiB "
             "(2^30 bytes). Targets (ANCHORS.md, H100): MNTP 1.3B reference 11.6k tok/s at 11.2 GB, ours >= 2x at "
             "no more memory; SimCSE 1.3B reference 2.0k tok/s at 11.6 GB, ours >= 3x.")
    rows = []

    def flush(row):
        # results are rewritten after every row: a run cut short by a time limit keeps what it measured
        print(row, flush=True)
        rows.append(row)
        add_ratios(rows)
        name = "training_steps_8b" if a.only == "mntp-8b" else "training_steps"
        return write_results(name, rows, title="Training steps: original recipe path vs llm2vec_fast",
                             columns=["step", "path", "tokens_per_s", "step_ms", "peak_mem_gb", "speedup_vs_ref",
                                      "mem_vs_ref"], notes=notes)

    if a.only in (None, "mntp"):
        bench_mntp("1.3B", LLAMA_1B3, 32, 512, warmup, steps, MNTP_VARIANTS, on_row=flush)
    if (a.only is None and a.full) or a.only == "mntp-8b":
        # ours keeps ~21 x hidden bytes per token per layer (GQA): about 22 GiB of activations at 16 x 512 over
        # 32 layers, on 16 GB of bf16 weights; half the layers checkpointed should fit under the reference's memory
        bench_mntp("Llama-3-8B cfg", LLAMA3_8B, 16, 512, warmup, steps,
                   [MNTP_VARIANTS[0], "ours + ckpt 1/2 of layers", "ours + ckpt"], on_row=flush)
    if a.only in (None, "simcse"):
        bench_simcse("1.3B", LLAMA_1B3, 128, 128, warmup, steps, SIMCSE_VARIANTS, on_row=flush)
    if a.profile and PROFILE["classes"]:
        write_results("training_profile", PROFILE["classes"] + PROFILE["kernels"],
                      columns=["step", "path", "class", "kernel", "calls", "seconds", "share_of_busy", "share_of_wall"],
                      title="Training steps under torch.profiler: device time by kernel class, then the top kernels",
                      notes=" ".join(PROFILE["notes"]) + " Device busy = the kernels' own times summed (one stream).")
    stem = "training_steps_8b" if a.only == "mntp-8b" else "training_steps"
    path = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / f"{stem}.json"
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
