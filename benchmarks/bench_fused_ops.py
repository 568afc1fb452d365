"""GPU benchmark of the fused elementwise ops against what Hugging Face runs in their place, bf16, peers in the
same run:

* ``rms_norm`` vs ``LlamaRMSNorm``'s forward (float32 upcast, variance, rsqrt, scale, downcast);
* ``silu_mul`` vs ``F.silu(gate) * up`` (the SwiGLU MLP's activation);
* ``rope`` vs ``apply_rotary_pos_emb`` on q and k (HF's ``[1, H, T, D]`` views of the projections' outputs), with
  HF's ``LlamaRotaryEmbedding`` tables for packed positions;
* ``dropout_project`` vs ``F.dropout(x, 0.05) @ A.T`` (a LoRA layer's input dropout and rank-16 down projection, what
  peft and the fused LoRA's torch path run), on the hidden-wide and the MLP-wide inputs.

Shapes: the 1.3B config (hidden 2048, MLP 5504, 16/16 heads of 128) and the 7B Mistral config (4096, 14336, 32/8
heads), 16k and 64k tokens. Forward alone and forward + backward (``triton.testing.do_bench`` medians); GB/s counts
the bytes each op must read and write at least (inputs once, outputs once).

    python benchmarks/bench_fused_ops.py           # ~40 s on an H100 -> results/fused_ops.{json,md} (or $OUT)
    python benchmarks/bench_fused_ops.py --smoke   # CPU, Triton interpreter, tiny shapes: checks the script only
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {"1.3B": dict(hidden=2048, inter=5504, hq=16, hkv=16, d=128),
           "7B": dict(hidden=4096, inter=14336, hq=32, hkv=8, d=128)}
TOKENS = (16384, 65536)


def _hf_norm(weight, eps):
    def f(x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    return f


def _hf_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    # HF's layout: [1, H, T, D] views of the [T, H, D] projection outputs; cos / sin [1, T, D]
    qo, ko = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    return qo, ko


def _tables(T, d, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=d * 2, num_attention_heads=2, head_dim=d)
    rot = LlamaRotaryEmbedding(cfg).to(device)
    pos = (torch.arange(T, device=device) % 300)[None]  # packed sequences of 300 tokens
    x = torch.empty(1, T, d, device=device, dtype=dtype)
    cos, sin = rot(x, pos)
    return cos[0], sin[0]


def _time(fn, args, grads_of=(), dys=None, bench=None):
    """ms of fn(*args), or of fn plus backward of its outputs with ``dys`` when ``grads_of`` is given."""
    def step():
        for t in grads_of:
            t.grad = None
        out = fn(*args)
        if grads_of:
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, dys)
    return bench(step)


def run(device, tokens, configs, bench, on_row=print):
    from llm2vec_fast.kernels import dropout_project, rms_norm, rope, silu_mul

    rows = []
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for name, c in configs.items():
        for T in tokens:
            g = torch.Generator(device=device).manual_seed(0)

            def rnd(*shape, g=g):  # drawn on the device: a 64k x 14336 draw on the host takes seconds
                return torch.randn(*shape, generator=g, device=device, dtype=dt)

            # rms_norm: read x and the weight, write y
            x, w = rnd(T, c["hidden"]), rnd(c["hidden"])
            dy = rnd(T, c["hidden"])
            cases = [("rms_norm", [(lambda a, ww=w: rms_norm(a, ww, 1e-6)), _hf_norm(w, 1e-6)], (x,), (dy,),
                      2 * x.numel() * x.element_size())]
            # silu_mul: read gate and up, write y
            gate, up = rnd(T, c["inter"]), rnd(T, c["inter"])
            cases.append(("silu_mul", [silu_mul, lambda a, b: F.silu(a) * b], (gate, up), (rnd(T, c["inter"]),),
                          3 * gate.numel() * gate.element_size()))
            # rope: read q, k (and the tables), write q_out, k_out; q / k are views of one projection output
            qkv = rnd(T, (c["hq"] + 2 * c["hkv"]) * c["d"])
            q = qkv[:, : c["hq"] * c["d"]].view(T, c["hq"], c["d"])
            k = qkv[:, c["hq"] * c["d"]: (c["hq"] + c["hkv"]) * c["d"]].view(T, c["hkv"], c["d"])
            cos, sin = _tables(T, c["d"], dt, device)
            dq, dk = rnd(T, c["hq"], c["d"]), rnd(T, c["hkv"], c["d"])
            hf_dys = (dq.transpose(0, 1)[None], dk.transpose(0, 1)[None])
            cases.append(("rope", [lambda a, b, cs=cos, sn=sin: rope(a, b, cs, sn),
                                   lambda a, b, cs=cos, sn=sin: _hf_rope(a, b, cs, sn)],
                          (q, k), None, 2 * (q.numel() + k.numel()) * q.element_size()))
            # dropout_project: a LoRA A projection (rank 16) with dropout 0.05 on its input, on the hidden-wide and the
            # MLP-wide inputs; read x, write the rank-16 product (the peer also writes and reads the dropped-out copy)
            for K in (c["hidden"], c["inter"]):
                xa, A = rnd(T, K), rnd(16, K) / K**0.5
                cases.append((f"dropout_project K{K}", [lambda a, b: dropout_project(a, b, 0.05),
                                                        lambda a, b: F.dropout(a, 0.05, training=True) @ b.t()],
                              (xa, A), (rnd(T, 16),), (xa.numel() + T * 16) * xa.element_size()))
            for op, (ours, hf), inputs, dys, nbytes in cases:
                res = {}
                for who, fn in (("ours", ours), ("hf", hf)):
                    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
                    if op == "rope":  # views of one tensor, as the projections give them
                        base = qkv.detach().clone().requires_grad_(True)
                        leaves = [base[:, : c["hq"] * c["d"]].view(T, c["hq"], c["d"]),
                                  base[:, c["hq"] * c["d"]: (c["hq"] + c["hkv"]) * c["d"]].view(T, c["hkv"], c["d"])]
                        grads_of, d = (base,), ((dq, dk) if who == "ours" else hf_dys)
                    else:
                        grads_of, d = leaves, dys
                    with torch.no_grad():
                        res[who + "_fwd"] = _time(fn, [t.detach() for t in leaves], bench=bench)
                    res[who] = _time(fn, leaves, grads_of, d, bench=bench)
                rows.append({"op": op, "config": name, "tokens": T, "ours_fwd_ms": res["ours_fwd"],
                             "hf_fwd_ms": res["hf_fwd"], "fwd_speedup": res["hf_fwd"] / res["ours_fwd"],
                             "ours_ms": res["ours"], "hf_ms": res["hf"], "fwd_bwd_speedup": res["hf"] / res["ours"],
                             "ours_fwd_GB/s": nbytes / 1e9 / (res["ours_fwd"] / 1e3)})
                on_row(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes; writes nothing")
    a = p.parse_args(argv)
    if a.smoke:
        import time

        def bench(fn):
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)

        tiny = {"tiny": dict(hidden=64, inter=96, hq=4, hkv=2, d=16)}
        run("cpu", (37,), tiny, bench, on_row=lambda rows: print(rows[-1], flush=True))
        return 0
    if not torch.cuda.is_available():
        print("bench_fused_ops.py needs a CUDA GPU (bf16 kernel timings); --smoke checks the script on the CPU.",
              file=sys.stderr)
        return 2
    from benchmarks.common import bench_gpu, write_results

    def flush(rows):
        # rewritten after every row: a run cut short by its time limit keeps what it measured
        print(rows[-1], flush=True)
        return write_results("fused_ops", rows, title="Fused elementwise ops vs what Hugging Face runs (bf16)",
                             notes="speedup = HF ms / ours ms (dropout_project: torch's dropout then matmul); fwd+bwd "
                                   "includes the gradients of every input. GB/s: the bytes the op must move at least "
                                   "(inputs and outputs once), over our forward time.")

    run("cuda", TOKENS, CONFIGS, lambda fn: bench_gpu(fn, warmup=10, rep=50), on_row=flush)
    print("wrote fused_ops.{json,md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
