"""GPU benchmark of the packed bidirectional flash attention against every attention PyTorch users can reach.

    python benchmarks/bench_attention.py                  # full grid → results/attention.{json,md} (or $OUT)
    python benchmarks/bench_attention.py --quick          # headline shapes only
    python benchmarks/bench_attention.py --check          # bf16 parity on big shapes (2× rule), PASS/FAIL per case
    python benchmarks/bench_attention.py --check --bench  # the one-command GPU check: parity, then the benchmark
    python benchmarks/bench_attention.py --causal --quick # flash_attention(causal=True) against causal peers

Shapes (bf16): packs of exactly 16,384 tokens whose lengths are drawn uniform in [S/4, S] for S in 128, 512, 2048,
8192 (the last length is trimmed to hit the budget), and packs of real texts: WikiText-2 test paragraphs and wiki1m
sentences, tokenized with ``--tokenizer`` (a Hugging Face tokenizer folder; default ``.cache/device/smollm2`` when
present, else ≈ chars/4) or read from ``--lengths-file`` (JSON ``{"wikitext2": [...], "wiki1m": [...]}``, token
counts per text). Heads Hq/Hkv, D: 32/8 128 (Llama-3-8B, Mistral-7B), 16/16 128 (Llama 1.3B), 9/3 64 (SmolLM2).
The first call of each head dim compiles and autotunes the kernels (a few seconds, outside the timings); the full grid
takes about 3-4 minutes on an H100, ``--quick`` about 1.5.

Peers, timed in the same run (``triton.testing.do_bench`` medians): SDPA flash and cuDNN on dense equal-length B×S
batches (the speed of light for the same S; no padding); SDPA with a padding mask on the padded batch (the Hugging
Face path, kv heads repeated as HF's ``repeat_kv`` does); FlexAttention with a document mask over the same pack
(compiled); ``torch.nn.attention.varlen.varlen_attn`` when present (its signature differs between torch versions and
is adapted by inspection); ``flash_attn_varlen_func`` when flash-attn is installed. Forward and forward+backward.

TFLOP/s count only real tokens' work: forward 4·ΣL²·Hq·D, backward 2.5× that (dense rows: 4·B·S²·Hq·D). The
headline columns are ratios of our TFLOP/s to the peers'. Ours is timed twice on Hopper: the default forward
(pointer loads) and the opt-in TMA forward (``LLM2VEC_FAST_ATTN_TMA=1``, column ``ours_tma``); ratios use the
better one (column ``best``), so the run tells whether TMA should become the default. With grouped heads, ``ours``
is the autotuner's pick between per-head and GQA-packed query rows (column ``tiles``) and ``ours_head`` the per-head
layout alone: ``×ours_head`` is what the packed layout gained. For sentence-length packs the tuner also weighs
multi-sequence tiles (several sentences per tile, "+multi" in ``tiles``); ``ours_seq`` is the per-sequence tiles
alone, so ``×ours_seq`` is what they gained.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import DATA, bench_gpu, write_results  # noqa: E402

TOKENS = 16384  # tokens per pack: a realistic encode / training batch, constant so compiled peers compile once
HEADS = [(32, 8, 128), (16, 16, 128), (9, 3, 64)]
SEQS = (128, 512, 2048, 8192)
QUICK_HEADS = [(32, 8, 128), (9, 3, 64)]
QUICK_SEQS = (512, 2048)
DTYPE = torch.bfloat16
DEVICE = "cuda"  # module constants, so that a CPU dry run can shrink and redirect them


# ----------------------------------------------------------------------------------------------------------------------
# lengths
# ----------------------------------------------------------------------------------------------------------------------
def _uniform_pack(S, seed=0):
    g = torch.Generator().manual_seed(seed + S)
    lens = []
    while sum(lens) < TOKENS:
        lens.append(int(torch.randint(S // 4, S + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - TOKENS
    return [l for l in lens if l > 0]


def _corpus_texts():
    wt = DATA / "wiki_text" / "wikitext-2-raw.wiki.test.raw"
    w1 = DATA / "wiki_text" / "wiki1m_for_simcse.head1280000B.txt"
    out = {}
    if wt.is_file():
        lines = [ln.strip() for ln in wt.read_text(encoding="utf-8", errors="ignore").splitlines()]
        out["wikitext2"] = [ln for ln in lines if ln and not ln.startswith("= ")]
    if w1.is_file():
        out["wiki1m"] = [ln.strip() for ln in w1.read_text(encoding="utf-8", errors="ignore").splitlines()
                         if ln.strip()]
    return out


def real_lengths(lengths_file=None, tokenizer=None, max_len=512):
    """{corpus: [token counts]} from a JSON file, a tokenizer folder, or chars/4 when neither is given."""
    if lengths_file:
        data = json.loads(Path(lengths_file).read_text())
        return {k: [min(max_len, max(1, int(x))) for x in v] for k, v in data.items()}, f"file {lengths_file}"
    texts = _corpus_texts()
    if not texts:
        return {}, "no corpus found under " + str(DATA)
    tok_dir = tokenizer or (ROOT / ".cache" / "device" / "smollm2")
    if tok_dir and Path(tok_dir).is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir))
            out = {k: [min(max_len, max(1, len(ids))) for ids in tok(v, add_special_tokens=True)["input_ids"]]
                   for k, v in texts.items()}
            return out, f"tokenized with {Path(tok_dir).name}"
        except Exception as e:  # noqa: BLE001 - fall back to the estimate, and say so
            print(f"[bench_attention] tokenizer {tok_dir} failed ({e}); using chars/4", file=sys.stderr)
    return {k: [min(max_len, max(1, math.ceil(len(t) / 4))) for t in v] for k, v in texts.items()}, "chars/4 estimate"


def _real_pack(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(lens), generator=g).tolist()
    out, total = [], 0
    for i in idx * (1 + TOKENS // max(1, sum(lens))):
        if total + lens[i] > TOKENS:
            out.append(TOKENS - total)
            break
        out.append(lens[i])
        total += lens[i]
    return [l for l in out if l > 0]


# ----------------------------------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------------------------------
def _varlen_peer():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:  # noqa: BLE001
        return None, f"varlen_attn unavailable ({type(e).__name__})"
    params = inspect.signature(varlen_attn).parameters

    def call(q, k, v, cu, m, causal=False):
        kw = {}
        if "is_causal" in params:  # torch 2.10 / 2.11
            kw["is_causal"] = causal
        if "window_size" in params:  # torch 2.12+: causal is the window (-1, 0)
            kw["window_size"] = (-1, 0) if causal and "is_causal" not in params else (-1, -1)
        elif causal and "is_causal" not in params:
            raise TypeError("this varlen_attn takes neither is_causal nor window_size")
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:  # older signature: no GQA, repeat kv (counted in its time, as a user would have to)
                G = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        return varlen_attn(q, k, v, cu, cu, m, m, **kw)

    return call, "varlen_attn(" + ", ".join(params) + ")"


def _flash_attn_peer():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001
        return None
    return lambda q, k, v, cu, m, causal=False: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal)


_FLEX = {}


def _flex_peer(T, lens, device, causal=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def causal_mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    try:
        bm = create_block_mask(causal_mask_mod if causal else mask_mod, None, None, T, T, device=device,
                               _compile=True)
    except TypeError:
        bm = create_block_mask(causal_mask_mod if causal else mask_mod, None, None, T, T, device=device)
    fn = _FLEX["fn"]

    def call(q, k, v, cu, m, causal=False):
        # [T, H, D] → [1, H, T, D] views, no copies (the causal mask is in the block mask)
        o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm,
               enable_gqa=q.shape[1] != k.shape[1])
        return o[0].transpose(0, 1)

    return call


def _sdpa_dense(backend, causal=False):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):  # [B, H, S, D]
        with sdpa_kernel(backend):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
            except RuntimeError:
                G = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                      is_causal=causal)

    return call


def _sdpa_padded(q, k, v, mask):
    # the Hugging Face sdpa path: repeat_kv, then SDPA with a [B, 1, L, L] boolean padding mask
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------------
def _tuned_tiles():
    """The autotuner's picks for the last call of our forward and dQ kernels: "BMxBN/warps/stages", "+pack" for
    GQA-packed rows (the layout that fills short sequences' tiles G times better), "+multi" for the forward's
    multi-sequence tiles (several sentences per tile)."""
    from llm2vec_fast.kernels import attention as A

    out = []
    for name, kernel in (("fwd", A._attn_fwd_kernel), ("dq", A._attn_bwd_dq_kernel)):
        c = getattr(kernel, "best_config", None)
        if c is not None:
            kw = c.kwargs
            out.append(f"{name} {kw['BM']}x{kw['BN']}/{c.num_warps}/{c.num_stages}{'+pack' if kw.get('PACK') else ''}"
                       f"{'+multi' if kw.get('MULTI') else ''}")
    return ", ".join(out) or None


def _time(fn, inputs, do, bwd, warmup, rep):
    """Median ms of fn(*inputs) (forward) or of forward + autograd.grad (bwd); None if the peer fails."""
    try:
        if bwd:
            xs = [x.detach().requires_grad_(True) for x in inputs[:3]]
            args = (*xs, *inputs[3:])

            def step():
                torch.autograd.grad(fn(*args), xs, do)
        else:
            def step():
                with torch.no_grad():
                    fn(*inputs)
        step()
        torch.cuda.synchronize()
        return bench_gpu(step, warmup=warmup, rep=rep)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape gets a blank, with the reason printed
        print(f"    peer failed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return None


def _tflops(flops, ms):
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def _tma_possible(q):
    from llm2vec_fast.kernels import attention as attn_mod

    old = attn_mod._FORCE_TMA
    attn_mod._FORCE_TMA = True
    try:
        return attn_mod._use_tma(q)
    finally:
        attn_mod._FORCE_TMA = old


def _with_tma(fn):
    """The same public function with the opt-in TMA forward switched on for the call."""
    from llm2vec_fast.kernels import attention as attn_mod

    def call(*a, **kw):
        old = attn_mod._FORCE_TMA
        attn_mod._FORCE_TMA = True
        try:
            return fn(*a, **kw)
        finally:
            attn_mod._FORCE_TMA = old

    return call


_LAYOUT_CACHES = {}


@contextlib.contextmanager
def _forced_layout(flag="_FORCE_PACK", value=False):
    """Our kernels with one tiling choice forced, forward and backward, with tuning choices of their own (a cache per
    forced choice): ``_FORCE_PACK`` False gives the per-head query rows (the layout before GQA packing),
    ``_FORCE_MULTI`` False the per-sequence tiles alone: the A/B of what the autotuner picked."""
    from llm2vec_fast.kernels import attention as attn_mod

    kernels = (attn_mod._attn_fwd_kernel, attn_mod._attn_bwd_dkdv_kernel, attn_mod._attn_bwd_dq_kernel)
    saved, old = [k.cache for k in kernels], getattr(attn_mod, flag)
    setattr(attn_mod, flag, value)
    for k in kernels:
        k.cache = _LAYOUT_CACHES.setdefault((id(k), flag, value), {})
    try:
        yield
    finally:
        setattr(attn_mod, flag, old)
        for k, c in zip(kernels, saved, strict=True):
            k.cache = c


_VARIANTS = {"ours_head": ("_FORCE_PACK", False), "ours_seq": ("_FORCE_MULTI", False)}


def bench_case(name, lens, hq, hkv, d, dense_S, args, peers, causal=False):
    import functools

    from llm2vec_fast.kernels import flash_attention

    if causal:  # every packed peer takes the same causal flag; work counted is the lower triangle only
        flash_attention = functools.partial(flash_attention, causal=True)
        peers = {**peers, **{p: functools.partial(peers[p], causal=True) for p in ("varlen", "flash_attn")
                             if peers[p]}}
    dev = DEVICE
    T, B, m = sum(lens), len(lens), max(lens)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(T, hq, d, device=dev, dtype=DTYPE, generator=g)
    k = torch.randn(T, hkv, d, device=dev, dtype=DTYPE, generator=g)
    v = torch.randn(T, hkv, d, device=dev, dtype=DTYPE, generator=g)
    do = torch.randn(T, hq, d, device=dev, dtype=DTYPE, generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(dev)
    real = (2.0 if causal else 4.0) * sum(l * l for l in lens) * hq * d
    W, R = args.warmup, args.rep
    row = {"case": name, "Hq/Hkv": f"{hq}/{hkv}", "D": d, "T": T, "B": B, "max_len": m,
           "mean_len": round(T / B, 1)}
    res = {}
    packed = [("ours", flash_attention)]
    if hq != hkv and peers.get("others", True):  # grouped heads: the tuner weighs the packed layout; A/B it
        packed.append(("ours_head", flash_attention))
    if sum(x * x for x in lens) <= 256 * T and peers.get("others", True):
        # sentences: the tuner weighs multi-sequence tiles too; the per-sequence tiles alone are the A/B
        packed.append(("ours_seq", flash_attention))
    if _tma_possible(q):
        packed.append(("ours_tma", _with_tma(flash_attention)))
    if peers["varlen"]:
        packed.append(("varlen", peers["varlen"]))
    if peers["flash_attn"]:
        packed.append(("flash_attn", peers["flash_attn"]))
    if peers["flex"]:
        try:
            packed.append(("flex", _flex_peer(T, lens, dev, causal)))
        except Exception as e:  # noqa: BLE001
            print(f"    flex unavailable: {e}", file=sys.stderr)
    for pname, fn in packed:
        with _forced_layout(*_VARIANTS[pname]) if pname in _VARIANTS else contextlib.nullcontext():
            for bwd in (False, True):
                ms = _time(fn, (q, k, v, cu, m), do, bwd, W, R)
                res[(pname, bwd)] = _tflops(real * (3.5 if bwd else 1.0), ms)
        if pname == "ours":
            row["tiles"] = _tuned_tiles()
    # HF path: padded [B, L, H, D] batch with a key-padding mask
    if peers.get("others", True) and T * m <= 16 * TOKENS * 512:  # the padded batch stays within a few GB
        qp, kp, vp, dop = (torch.zeros(B, m, x.shape[1], d, device=dev, dtype=DTYPE) for x in (q, k, v, do))
        keep = torch.zeros(B, m, dtype=torch.bool, device=dev)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            for dst, src in ((qp, q), (kp, k), (vp, v), (dop, do)):
                dst[i, : b - a] = src[a:b]
            keep[i, : b - a] = True
        mask = keep[:, None, None, :].expand(B, 1, m, m)
        if causal:
            mask = mask & torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        qp, kp, vp, dop = (x.transpose(1, 2) for x in (qp, kp, vp, dop))
        for bwd in (False, True):
            ms = _time(_sdpa_padded, (qp, kp, vp, mask), dop, bwd, W, R)
            res[("sdpa_pad", bwd)] = _tflops(real * (3.5 if bwd else 1.0), ms)
        del qp, kp, vp, dop, mask
    # dense equal-length peers (same token count, every row length S)
    if dense_S and peers.get("others", True):
        from torch.nn.attention import SDPBackend

        Bd = TOKENS // dense_S
        qd = torch.randn(Bd, hq, dense_S, d, device=dev, dtype=DTYPE, generator=g)
        kd = torch.randn(Bd, hkv, dense_S, d, device=dev, dtype=DTYPE, generator=g)
        vd = torch.randn(Bd, hkv, dense_S, d, device=dev, dtype=DTYPE, generator=g)
        dod = torch.randn(Bd, hq, dense_S, d, device=dev, dtype=DTYPE, generator=g)
        dense = (2.0 if causal else 4.0) * Bd * dense_S * dense_S * hq * d
        for pname, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            for bwd in (False, True):
                ms = _time(_sdpa_dense(be, causal), (qd, kd, vd), dod, bwd, W, R)
                res[(pname, bwd)] = _tflops(dense * (3.5 if bwd else 1.0), ms)
    for (pname, bwd), tf in res.items():
        row[f"{pname} {'fwd+bwd' if bwd else 'fwd'}"] = None if tf is None else round(tf, 1)
    # ratios use the better of our two forwards (pointer loads / opt-in TMA), named in "best"
    ours_f, ours_b = res.get(("ours", False)), res.get(("ours", True))
    tma_f, tma_b = res.get(("ours_tma", False)), res.get(("ours_tma", True))
    if tma_f and ours_f and tma_f > ours_f:
        ours_f, ours_b, row["best"] = tma_f, max(ours_b or 0, tma_b or 0) or None, "tma"
    else:
        row["best"] = "ptr"
    for pname in ("varlen", "cudnn", "sdpa_flash", "sdpa_pad", "flex", "flash_attn", "ours_head", "ours_seq"):
        for bwd, ours in ((False, ours_f), (True, ours_b)):
            peer = res.get((pname, bwd))
            if peer and ours:
                row[f"×{pname} {'fwd+bwd' if bwd else 'fwd'}"] = round(ours / peer, 2)
    print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# parity check
# ----------------------------------------------------------------------------------------------------------------------
_g = torch.Generator().manual_seed(0)
# (name, lengths, Hq, Hkv, D, options) for --check: every head dim family, GQA/MQA/MHA, softcap, dropout, 4k segments
CHECK_CASES = [
    ("uniform[512,2048] 32/8 D128", torch.randint(512, 2049, (6,), generator=_g).tolist(), 32, 8, 128, {}),
    ("lens 1..4100 16/16 D80 softcap", [1, 7, 63, 97, 130, 1000, 4100], 16, 16, 80, {"softcap": 5.0}),
    ("uniform[16,300] 4/2 D96 dropout", torch.randint(16, 301, (6,), generator=_g).tolist(), 4, 2, 96,
     {"dropout_p": 0.3, "seed": 5}),
    ("uniform[1,1500] 32/8 D128 causal", torch.randint(1, 1501, (6,), generator=_g).tolist(), 32, 8, 128,
     {"causal": True}),
    ("uniform[300,3000] 16/4 D128 window (255, 255)", torch.randint(300, 3001, (5,), generator=_g).tolist(), 16, 4,
     128, {"window_size": (255, 255)}),
    # not in --quick
    ("uniform[1,600] 9/3 D64", torch.randint(1, 601, (24,), generator=_g).tolist(), 9, 3, 64, {}),
    ("uniform[32,700] 8/1 D256", torch.randint(32, 701, (8,), generator=_g).tolist(), 8, 1, 256, {}),
    ("uniform[8,200] 12/4 D32", torch.randint(8, 201, (10,), generator=_g).tolist(), 12, 4, 32, {}),
]
QUICK_CHECK = 5  # the first five: GQA, MHA + softcap + padded head dim + 4k segment, dropout, causal, window


def _fwd_bwd(fn, inputs, dt, **kw):
    q, k, v, do, cu, m = inputs
    xs = [x.to(dt).detach().requires_grad_(True) for x in (q, k, v)]
    o, lse = fn(*xs, cu, m, return_lse=True, **kw)
    return (o, lse, *torch.autograd.grad(o, xs, do.to(dt)))


def check(quick=False):
    """bf16 kernel vs the fp32 reference on big packs: error ≤ 2× the bf16 reference's (3× for gradients) + atol.

    Tiles are not tuned here (LLM2VEC_FAST_AUTOTUNE=1 unless set): parity does not depend on them, compiles do."""
    os.environ.setdefault("LLM2VEC_FAST_AUTOTUNE", "1")
    from llm2vec_fast.kernels import flash_attention
    from llm2vec_fast.kernels.attention import dropout_keep_mask
    from llm2vec_fast.kernels.reference import flash_attention_ref

    dev = DEVICE
    ok = True
    for name, lens, hq, hkv, d, kw in CHECK_CASES[:QUICK_CHECK] if quick else CHECK_CASES:
        T = sum(lens)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        cu = cu.to(dev)
        q = torch.randn(T, hq, d, device=dev, dtype=DTYPE) * (3.0 if "softcap" in kw else 1.0)
        k, v = (torch.randn(T, hkv, d, device=dev, dtype=DTYPE) for _ in range(2))
        do = torch.randn(T, hq, d, device=dev, dtype=DTYPE)
        rkw = dict(kw)
        if "dropout_p" in kw:
            rkw["_dropout_mask"] = dropout_keep_mask(kw["seed"], kw["dropout_p"], hq, T, dev)

        inputs = (q, k, v, do, cu, max(lens))
        ref32 = _fwd_bwd(flash_attention_ref, inputs, torch.float32, **rkw)
        reflp = _fwd_bwd(flash_attention_ref, inputs, DTYPE, _upcast=False, **rkw)
        variants = [("", flash_attention)]
        if _tma_possible(q):
            variants.append((" [tma fwd]", _with_tma(flash_attention)))
        for tag, fn in variants:
            ours = _fwd_bwd(fn, inputs, DTYPE, **kw)
            msgs = []
            for nm, a, b, c, fac in zip(("o", "lse", "dq", "dk", "dv"), ours, ref32, reflp, (2, 2, 3, 3, 3),
                                        strict=True):
                err = (a.float() - b).abs().max().item()
                err_lp = (c.float() - b).abs().max().item()
                atol = 1e-3 * max(1.0, b.abs().max().item())
                good = err <= fac * err_lp + atol and not a.isnan().any().item()
                ok &= good
                msgs.append(f"{nm} {err:.2e}/{err_lp:.2e}{'' if good else ' FAIL'}")
            print(f"{'PASS' if all('FAIL' not in m for m in msgs) else 'FAIL'}  {name}{tag} (T={T}): "
                  + ", ".join(msgs), flush=True)
    print("CHECK PASS" if ok else "CHECK FAIL", flush=True)
    return ok


# ----------------------------------------------------------------------------------------------------------------------
WINDOW_CASES = ((4096, 512), (8192, 512), (8192, 4096))  # (sequence length, window)


def bench_window(args, cases=WINDOW_CASES, heads=(16, 8, 256), tokens=None):
    """Local attention (a Gemma-style sliding window W, ``window_size=(W - 1, W - 1)``) against the same kernel's full
    attention and against the path such layers took before the kernel had windows (per-length SDPA with a band mask,
    ``packed_torch_attention``): milliseconds, forward and forward + backward, one pack of equal-length sequences."""
    from llm2vec_fast.kernels import flash_attention

    from llm2vec_fast.bidirectional import packed_torch_attention

    hq, hkv, d = heads  # default: Gemma-2/3's head dim
    rows = []
    for S, W in cases:
        lens = [S] * max(1, (tokens or TOKENS) // S)
        T, m = sum(lens), S
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, do = (torch.randn(T, hq, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
        k, v = (torch.randn(T, hkv, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        paths = {"full": lambda q, k, v, cu, m: flash_attention(q, k, v, cu, m),
                 "window": lambda q, k, v, cu, m, W=W: flash_attention(q, k, v, cu, m, window_size=(W - 1, W - 1)),
                 "torch_band": lambda q, k, v, cu, m, W=W: packed_torch_attention(q, k, v, cu, m, d ** -0.5,
                                                                                  window=W)}
        row = {"case": f"{len(lens)} x {S}, W {W}", "Hq/Hkv": f"{hq}/{hkv}", "D": d}
        for name, fn in paths.items():
            for bwd in (False, True):
                ms = _time(fn, (q, k, v, cu, m), do, bwd, args.warmup, args.rep)
                row[f"{name} {'fwd+bwd' if bwd else 'fwd'} ms"] = None if ms is None else round(ms, 3)
        for bwd in ("fwd", "fwd+bwd"):
            ours = row.get(f"window {bwd} ms")
            for peer in ("full", "torch_band"):
                other = row.get(f"{peer} {bwd} ms")
                if ours and other:
                    row[f"×{peer} {bwd}"] = round(other / ours, 2)
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline shapes only")
    ap.add_argument("--check", action="store_true", help="bf16 parity on big shapes (PASS/FAIL); alone: no benchmark")
    ap.add_argument("--bench", action="store_true", help="with --check: run the benchmark after the parity check")
    ap.add_argument("--lengths-file", help='JSON {"corpus": [token counts per text]}')
    ap.add_argument("--tokenizer", help="Hugging Face tokenizer folder for the real-length packs")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles cost ~20 s per head set)")
    ap.add_argument("--flex-only", action="store_true",
                    help="ours against FlexAttention alone (its compiles take minutes on a fresh machine: the GPU "
                         "check runs it as a step of its own); writes attention_flex[_causal]")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/results)")
    ap.add_argument("--window", action="store_true", help="local attention (window_size) against full attention and "
                    "the band-masked SDPA path → attention_window.{json,md}")
    ap.add_argument("--causal", action="store_true", help="the causal variant (flash_attention(causal=True)) against "
                    "the peers' causal modes → attention_causal.{json,md}")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (the Triton kernels are timed on the device); nothing to do on CPU. "
              "CPU correctness lives in tests/kernels/test_attention.py.", file=sys.stderr)
        return 2
    t0 = time.time()
    user_tune = os.environ.get("LLM2VEC_FAST_AUTOTUNE")
    if args.check:
        ok = check(args.quick)
        print(f"[bench_attention] check took {time.time() - t0:.0f} s", flush=True)
        if not args.bench:
            return 0 if ok else 1
    # the benchmark tunes: all tiles, or with --quick the three likeliest per head dim (each tile costs a compile): for
    # grouped heads the first two per-head tiles and the first GQA-packed one on long packs, small tiles first on short
    if user_tune is None:
        os.environ.pop("LLM2VEC_FAST_AUTOTUNE", None)
        if args.quick:
            os.environ["LLM2VEC_FAST_AUTOTUNE"] = "3"

    if args.window:
        rows = bench_window(args)
        path = write_results("attention_window", rows, out_dir=args.out, title="Local (sliding-window) attention",
                             notes=f"bf16; ×peer = peer's time / ours (window). Wall time {time.time() - t0:.0f} s.")
        print(f"[bench_attention] wrote {path} in {time.time() - t0:.0f} s")
        return 0
    varlen, varlen_note = _varlen_peer()
    peers = {"varlen": varlen, "flash_attn": _flash_attn_peer(), "flex": not args.no_flex}
    if args.flex_only:
        if args.no_flex:
            raise SystemExit("--flex-only and --no-flex contradict each other")
        peers = {"varlen": None, "flash_attn": None, "flex": True, "others": False}
    print(f"[bench_attention] {torch.cuda.get_device_name()} · {varlen_note} · flash_attn "
          f"{'yes' if peers['flash_attn'] else 'not installed'}", flush=True)
    heads = QUICK_HEADS if args.quick else HEADS
    if args.flex_only and args.quick:
        heads = heads[:1]  # Flex's compile per head set is the cost: the headline set only
    seqs = QUICK_SEQS if args.quick else SEQS
    real, real_note = real_lengths(args.lengths_file, args.tokenizer)
    rows = []
    for i_head, (hq, hkv, d) in enumerate(heads):
        if args.quick and i_head:  # FlexAttention compiles cost ~20-30 s per head set: headline set only
            peers["flex"] = False
        for S in seqs:
            rows.append(bench_case(f"uniform[{S // 4},{S}]", _uniform_pack(S), hq, hkv, d, S, args, peers,
                                   args.causal))
        for corpus, lens in real.items():
            if args.quick and (hq, hkv, d) != QUICK_HEADS[-1]:
                continue
            rows.append(bench_case(f"{corpus} ({real_note})", _real_pack(lens), hq, hkv, d, None, args, peers,
                                   args.causal))
        _FLEX.clear()  # a new head set compiles anew; drop the old graphs
        torch.compiler.reset()
    notes = (("Causal: every peer in its causal mode, work counted is the lower triangle (fwd 2·ΣL²·Hq·D). "
              if args.causal else "") +
             f"bf16, packs of {TOKENS} tokens; TFLOP/s count real tokens only (fwd 4·ΣL²·Hq·D, bwd 2.5×); dense peers "
             f"(sdpa_flash, cudnn) run equal-length B×S batches with the same token count. ×peer = ours / peer. "
             f"{varlen_note}. Real lengths: {real_note}. Wall time {time.time() - t0:.0f} s.")
    # headline ratios first (the targets), then our TFLOP/s, then every peer's
    order = ["×varlen fwd", "×cudnn fwd", "×flex fwd+bwd", "best", "ours fwd", "ours_tma fwd", "ours fwd+bwd", "tiles"]
    seen = {c for r in rows for c in r}
    base = ["case", "Hq/Hkv", "D", "B", "mean_len", "max_len"]
    cols = base + [c for c in order if c in seen]
    cols += sorted(c for c in seen if c.startswith("×") and c not in cols)
    cols += sorted(c for c in seen if c not in cols and c != "T")
    stem = "attention_flex" if args.flex_only else "attention"
    path = write_results(f"{stem}_causal" if args.causal else stem, rows, out_dir=args.out, columns=cols,
                         title="Packed causal attention" if args.causal else "Packed bidirectional attention",
                         notes=notes)
    print(f"[bench_attention] wrote {path} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_attention.py times the compiled kernels: unset TRITON_INTERPRET", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
