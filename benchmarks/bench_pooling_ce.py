"""GPU benchmark of the two small kernels: masked pooling and fused linear cross-entropy, each against torch.

    python benchmarks/bench_pooling_ce.py            # timings + peak memory → results/pooling_ce.{json,md} (or $OUT)
    python benchmarks/bench_pooling_ce.py --check    # bf16 parity on big shapes, prints PASS/FAIL per case

Pooling: ours vs ``masked_pool_ref`` (vectorised torch: per-token weights + index_add) on packed bf16 batches of
~16k tokens whose lengths follow WikiText-2 paragraphs and wiki1m sentences (chars / 4, clipped to 512; log-normal
synthetic lengths when ../shared/data is absent), half of them with an instruction prefix; fwd+bwd, GB/s counts the
hidden states read (fwd) and the hidden gradient written (bwd).
Cross-entropy: ours vs torch (``h @ W.T`` full logits then ``F.cross_entropy``), bf16, N = 16x512x0.2 masked rows
(MNTP) and 4096, H 2048 / 4096, V 49152 / 128256; fwd+bwd with grads for hidden only (LoRA: frozen LM head) and for
hidden + weight; peak memory above the inputs (``torch.cuda.max_memory_allocated``). Runs in ~1 minute on an H100.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA, bench_gpu, write_results  # noqa: E402

# shapes (module constants so that a dry run can shrink them)
DEVICE = "cuda"
POOL_TOKENS, POOL_DIMS = 16384, (2048, 4096)
CE_VOCABS, CE_HIDDEN, CE_ROWS = (49152, 128256), (2048, 4096), (int(16 * 512 * 0.2), 4096)
CHECK_POOL_DIM, CHECK_CE = 4096, ((1638, 2048, 49152, False, 256), (1024, 4096, 128256, True, 256))


def _lengths(corpus, n, seed=0):
    """Token-length sample of a corpus (≈ chars / 4, clipped to [1, 512]); synthetic log-normal when data is absent."""
    g = torch.Generator().manual_seed(seed)
    files = {"wikitext": DATA / "wiki_text" / "wikitext-2-raw.wiki.test.raw",
             "wiki1m": DATA / "wiki_text" / "wiki1m_for_simcse.head1280000B.txt"}
    path = files[corpus]
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="ignore").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("=")]
        lens = torch.tensor([min(512, max(1, math.ceil(len(ln) / 4))) for ln in lines])
        return lens[torch.randint(len(lens), (n,), generator=g)].tolist(), str(path.name)
    lens = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(90 if corpus == "wikitext" else 26))
    return lens.clamp(1, 512).long().tolist(), "synthetic log-normal"


def _packed(corpus, D, dtype=torch.bfloat16, seed=0):
    lens, source = _lengths(corpus, 4096, seed)
    out, total = [], 0
    for l in lens:  # fill a token budget, like the encode pipeline's batches
        if total + l > POOL_TOKENS:
            break
        out.append(l)
        total += l
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(out) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(out).cumsum(0)
    ps = torch.tensor([min(l - 1, 12) if i % 2 else 0 for i, l in enumerate(out)], dtype=torch.int32).clamp(min=0)
    hidden = torch.randn(total, D, generator=g).to(dtype)
    return hidden.to(DEVICE), cu.to(DEVICE), ps.to(DEVICE), source


def bench_pooling(rows):
    from llm2vec_fast.kernels import masked_pool
    from llm2vec_fast.kernels.reference import masked_pool_ref

    for corpus in ("wikitext", "wiki1m"):
        for D in POOL_DIMS:
            hidden, cu, ps, source = _packed(corpus, D)
            T, B = hidden.shape[0], cu.numel() - 1
            dy = torch.randn(B, D, device=DEVICE, dtype=hidden.dtype)
            for mode, normalize in (("mean", False), ("weighted_mean", True), ("last_token", False)):
                h = hidden.clone().requires_grad_()
                res = {}
                for name, fn in (("ours", masked_pool), ("torch", masked_pool_ref)):
                    res[name] = bench_gpu(_Step(fn, (h, cu, mode, ps, normalize), (h,), dy))
                    res[name + "_fwd"] = bench_gpu(_Step(fn, (h.detach(), cu, mode, ps, normalize)))
                gbytes = 2 * T * D * hidden.element_size() / 1e9  # read hidden + write its gradient
                rows.append({"op": "masked_pool", "case": f"{corpus} T{T} B{B} D{D} {mode}{'+l2' if normalize else ''}",
                             "data": source, "ours_ms": res["ours"], "torch_ms": res["torch"],
                             "ours_fwd_ms": res["ours_fwd"], "torch_fwd_ms": res["torch_fwd"],
                             "speedup": res["torch"] / res["ours"], "ours_GB/s": gbytes / (res["ours"] / 1e3)})
                print(rows[-1], flush=True)


class _Step:
    """One timed call: ``fn(*args)``, then ``backward(dy)`` when ``leaves`` is given (their grads cleared first)."""

    def __init__(self, fn, args, leaves=(), dy=None):
        self.fn, self.args, self.leaves, self.dy = fn, args, leaves, dy

    def __call__(self):
        for t in self.leaves:
            t.grad = None
        out = self.fn(*self.args)
        if self.leaves:
            out.backward(self.dy)


def _leaves(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _torch_ce(h, w, y):
    return F.cross_entropy(h @ w.T, y, ignore_index=-100)


def _peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_ce(rows):
    from llm2vec_fast.kernels import fused_linear_cross_entropy

    g = torch.Generator(device=DEVICE).manual_seed(0)
    for V in CE_VOCABS:
        for H in CE_HIDDEN:
            w0 = (torch.randn(V, H, device=DEVICE, generator=g) * H**-0.5).bfloat16()
            for N in CE_ROWS:
                h0 = torch.randn(N, H, device=DEVICE, generator=g).bfloat16()
                y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
                for grads in ("hidden", "hidden+weight"):
                    h = h0.clone().requires_grad_()
                    w = w0.clone().requires_grad_(grads == "hidden+weight")
                    res = {}
                    for name, fn in (("ours", fused_linear_cross_entropy), ("torch", _torch_ce)):
                        step = _Step(fn, (h, w, y), (h, w), None)
                        res[name] = bench_gpu(step, warmup=5, rep=40)
                        res[name + "_mb"] = _peak_mb(step)
                        h.grad = w.grad = None
                    flops = 2 * N * H * V * (3 if grads == "hidden+weight" else 2)
                    rows.append({"op": "linear_ce", "case": f"N{N} H{H} V{V} grad {grads}",
                                 "ours_ms": res["ours"], "torch_ms": res["torch"],
                                 "speedup": res["torch"] / res["ours"],
                                 "ours_TFLOP/s": flops / res["ours"] / 1e9, "ours_peak_MB": res["ours_mb"],
                                 "torch_peak_MB": res["torch_mb"], "memory_ratio": res["torch_mb"] / res["ours_mb"]})
                    print(rows[-1], flush=True)
                    del h, w
            del w0


def check():
    """bf16 parity on big shapes against fp32 references: 2x the plain bf16 path's error (3x for gradients)."""
    from llm2vec_fast.kernels import fused_linear_cross_entropy, masked_pool
    from llm2vec_fast.kernels.reference import fused_linear_cross_entropy_ref, masked_pool_ref

    ok = True

    def verdict(name, err, tol):
        nonlocal ok
        good = err <= tol
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {name}: err {err:.3e} tol {tol:.3e}", flush=True)

    for corpus in ("wikitext", "wiki1m"):
        hidden, cu, ps, _ = _packed(corpus, CHECK_POOL_DIM)
        for mode in ("mean", "weighted_mean", "last_token", "first_token"):
            for normalize in (False, True):
                h, h32, hlp = (hidden.clone().requires_grad_(), hidden.float().requires_grad_(),
                               hidden.clone().requires_grad_())
                out = masked_pool(h, cu, mode, ps, normalize)
                r32 = masked_pool_ref(h32, cu, mode, ps, normalize)
                rlp = masked_pool_ref(hlp, cu, mode, ps, normalize)
                dy = torch.randn_like(out)
                out.backward(dy)
                r32.backward(dy.float())
                rlp.backward(dy)
                name = f"pool {corpus} {mode}{'+l2' if normalize else ''}"
                verdict(name + " out", (out.float() - r32).abs().max().item(),
                        2 * (rlp.float() - r32).abs().max().item() + 1e-5)
                verdict(name + " grad", (h.grad.float() - h32.grad).abs().max().item(),
                        3 * (hlp.grad.float() - h32.grad).abs().max().item() + 1e-5)

    g = torch.Generator(device=DEVICE).manual_seed(0)
    for N, H, V, bias, chunk in CHECK_CE:
        h0 = torch.randn(N, H, device=DEVICE, generator=g).bfloat16()
        w0 = (torch.randn(V, H, device=DEVICE, generator=g) * H**-0.5).bfloat16()
        b0 = torch.randn(V, device=DEVICE, generator=g).bfloat16() if bias else None
        y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
        y[::7] = -100

        (h, w, b), (h32, w32, b32), (hlp, wlp, blp) = (_leaves((h0, w0, b0)), _leaves((h0, w0, b0), torch.float32),
                                                       _leaves((h0, w0, b0)))
        # a 256-row chunk: several chunks even for the smaller case
        loss = fused_linear_cross_entropy(h, w, y, bias=b, _chunk_rows=chunk)
        r32 = fused_linear_cross_entropy_ref(h32, w32, y, bias=b32)
        rlp = F.cross_entropy(F.linear(hlp, wlp, blp).float(), y, ignore_index=-100)
        for t in (loss, r32, rlp):
            t.backward()
        name = f"ce N{N} H{H} V{V}{' bias' if bias else ''}"
        verdict(name + " loss", abs(loss.item() - r32.item()), 2 * abs(rlp.item() - r32.item()) + 1e-3)
        for gname, a, b_, c in (("hidden", h, h32, hlp), ("weight", w, w32, wlp), ("bias", b, b32, blp)):
            if a is not None:
                verdict(f"{name} grad {gname}", (a.grad.float() - b_.grad).abs().max().item(),
                        3 * (c.grad.float() - b_.grad).abs().max().item() + 1e-5)
        del h, w, b, h32, w32, b32, hlp, wlp, blp, loss, r32, rlp
    print("ALL PASS" if ok else "SOME FAILED")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="bf16 parity on big shapes (PASS/FAIL), no timings")
    ap.add_argument("--only", choices=["pooling", "ce"], help="run one of the two benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_pooling_ce.py needs a CUDA GPU (Triton kernels, cuBLAS timings); nothing to do on CPU. "
              "The CPU parity tests are tests/kernels/test_pooling.py and tests/kernels/test_cross_entropy.py.")
        return 0
    if args.check:
        return 0 if check() else 1
    rows = []
    if args.only in (None, "pooling"):
        bench_pooling(rows)
    if args.only in (None, "ce"):
        bench_ce(rows)
    path = write_results("pooling_ce", rows, title="Masked pooling and fused linear cross-entropy vs torch (bf16)",
                         notes="speedup = torch_ms / ours_ms (fwd+bwd); memory_ratio = torch peak / ours peak, "
                               "both above the inputs.")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
