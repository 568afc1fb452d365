"""Host cost of the GPU code path, measured on any CPU: what Python and torch's dispatcher spend per decoder layer
before the device does any work.

The Triton kernels go through the interpreter's launch plumbing with their bodies stubbed out (each launch is
counted, nothing is computed), the autotuner is limited to one tile (no timing runs), and every tensor is tiny, so
a forward (encode) or a forward + backward (a LoRA training step with attention dropout, the fused LoRA and the norm
rebuild) of a 24-layer Llama config costs only its host work. A device whose kernels take less time than this per
layer waits for the host: small packs, GradCache's chunks, short requests. The triton helpers ablation runs the same
step with the launchers' integer helpers swapped back to ``triton.cdiv`` / ``triton.next_power_of_2`` (constexpr
functions since triton 3.5, ~5 µs per host call).

Each row runs in its own process (the interpreter flag must be set before triton is imported); the time is the
minimum over ``--steps`` steps of this process's CPU time (``time.process_time``), which other load on a shared
machine moves less than wall time. Rounds alternate the variants.

    python benchmarks/bench_host_overhead.py          # ~1 min; writes host_overhead.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"ours": False, "ours, triton's cdiv / next_power_of_2 in the launchers": True}
LAYERS = 24


def worker(mode: str, triton_helpers: bool, steps: int) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LLM2VEC_FAST_AUTOTUNE"] = "1"
    import collections
    import importlib
    import time

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches = collections.Counter()

    def run(self, *args, grid, warmup, **kwargs):  # a launch, counted, not computed
        launches[self.fn.__name__] += 1

    InterpretedFunction.run = run
    torch.set_num_threads(1)
    from llm2vec_fast.kernels import masked_pool
    from llm2vec_fast.kernels.attention import prime_seq_info
    from llm2vec_fast.kernels.pooling import prime_pool_args
    from transformers import LlamaConfig, LlamaModel

    import llm2vec_fast.lora as lora
    from llm2vec_fast import fuse_ops, to_bidirectional
    from llm2vec_fast.bidirectional import set_attention_dropout
    from llm2vec_fast.encoder import pack
    from llm2vec_fast.training.common import add_lora

    if triton_helpers:
        import triton

        for name in ("attention", "lora_project", "rmsnorm", "rotary", "swiglu", "pooling", "cross_entropy"):
            mod = importlib.import_module(f"llm2vec_fast.kernels.{name}")
            for helper in ("cdiv", "next_power_of_2"):
                if hasattr(mod, helper):
                    setattr(mod, helper, getattr(triton, helper))
    lora.DROPOUT_KERNEL = "triton"  # the CUDA path: dropout drawn inside the rank-r kernels
    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=32, vocab_size=100)
    torch.manual_seed(0)
    model = to_bidirectional(LlamaModel(cfg), "triton")
    fuse_ops(model, backend="triton")
    if mode == "train":
        set_attention_dropout(model, 0.3)
        model = add_lora(model).train()
    else:
        model = model.eval()
    lens = [7, 5, 9, 3, 8, 6, 4, 10]
    f = pack([torch.randint(3, 100, (n,)).int().numpy() for n in lens], [0] * len(lens))
    cu, m = f["cu_seqlens"], f["max_seqlen"]

    def step():  # as LLM2Vec.hidden_states and the trainers run it
        prime_seq_info(cu, f["cu_seqlens_host"], m)
        prime_pool_args(cu, f["pool_start"], f["cu_seqlens_host"], f["pool_start_host"])
        h = model(input_ids=f["input_ids"][None], position_ids=f["position_ids"][None], cu_seq_lens_q=cu,
                  cu_seq_lens_k=cu, max_length_q=m, max_length_k=m, use_cache=False).last_hidden_state[0]
        e = masked_pool(h, cu, "mean", f["pool_start"])
        if mode == "train":
            e.float().sum().backward()

    ctx = torch.inference_mode() if mode == "encode" else torch.enable_grad()
    with ctx:
        for _ in range(3):
            step()
        launches.clear()
        times = []
        for _ in range(steps):
            t = time.process_time()
            step()
            times.append(time.process_time() - t)
    return {"ms_per_step": 1e3 * min(times), "launches": {k: v // steps for k, v in sorted(launches.items())}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "TRITON_HELPERS"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1] == "1", a.steps)))
        return

    from benchmarks.common import write_results

    got = {}
    for r in range(a.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for mode in ("train", "encode"):
            for variant in order:
                cmd = [sys.executable, __file__, "--worker", mode, "1" if VARIANTS[variant] else "0",
                       "--steps", str(a.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode:
                    raise RuntimeError(f"worker {mode} / {variant} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                got.setdefault((mode, variant), []).append(res)
                print(f"round {r + 1} {mode:6s} {variant}: {res['ms_per_step']:.1f} ms", flush=True)
    rows = []
    for mode in ("train", "encode"):
        base = min(x["ms_per_step"] for x in got[(mode, "ours")])
        for variant in VARIANTS:
            runs = got[(mode, variant)]
            best = min(x["ms_per_step"] for x in runs)
            launches = runs[0]["launches"]
            rows.append({"step": "LoRA training step (fwd + bwd)" if mode == "train" else "encode forward",
                         "path": variant, "host_ms_per_step": best, "host_ms_per_layer": best / LAYERS,
                         "x_vs_ours": best / base, "triton_launches_per_layer": sum(launches.values()) / LAYERS,
                         "launches": ", ".join(f"{k.removeprefix('_').removesuffix('_kernel')} {v}"
                                               for k, v in launches.items())})
    notes = (f"Llama config, {LAYERS} layers, hidden 64 (tiny tensors: host work only), a pack of 8 sequences; "
             "Triton launches stubbed under the interpreter's plumbing (counted per step in `launches`), one tile "
             "per autotuner key. Training: bidirectional, attention dropout 0.3, fused LoRA r 16 on all linear "
             f"layers, dropout 0.05 drawn in the kernels, fused RMSNorm / RoPE / SwiGLU. Minimum over {a.steps} "
             f"steps of the process's CPU time, best of {a.rounds} alternating rounds, one thread. This measures "
             "the host cost of the GPU code path on this CPU, not a GPU: the triton launcher's own C-side cost "
             "per launch comes on top there.")
    path = write_results("host_overhead", rows, out_dir=a.out, title="Host cost of the GPU code path (kernels "
                         "stubbed)", notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
