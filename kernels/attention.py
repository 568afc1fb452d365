"""Bidirectional flash attention on packed variable-length sequences (Triton), forward and backward.

Five layers, one way down: ``@triton.jit`` kernels → launchers (``attention_fwd`` / ``attention_bwd``: validate the
layout, allocate, pick blocks, compute the grid) → ``FlashAttentionFunction`` (autograd; saves q, k, v, o, lse) →
``flash_attention`` (the public function, documented and validated). The plain PyTorch twin is
:func:`llm2vec_fast.kernels.reference.flash_attention_ref`.

Kernel naming follows FLA: ``i_`` program indices, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` blocks,
uppercase compile-time sizes. Scores live in the log2 domain (``log2(e)`` folded into the scale) so that every
exponential is an ``exp2``; the log-sum-exp is stored in natural units.
"""
import inspect
import math
import os
import weakref

import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, kernel_seed, new_seed, next_power_of_2, on_input_device, version_of
from .reference import check_attention_args, check_seed
from .reference import validate_cu_seqlens as _validate_cu_seqlens

__all__ = ["flash_attention", "attention_fwd", "attention_bwd", "dropout_keep_mask", "FlashAttentionFunction",
           "prime_seq_info"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tests flip this so that every output buffer starts as NaN: a row the kernels forget to write then fails loudly.
_POISON_OUTPUTS = False
# Forces the TMA forward (tests use it under the interpreter); on GPUs LLM2VEC_FAST_ATTN_TMA=1 opts in.
_FORCE_TMA = False
# Forces the query-row layout of the pointer forward, dQ and dK/dV (True: GQA-packed rows, False: per-head rows); None
# lets the autotuner choose on the GPU and takes per-head rows under the interpreter. Tests set it.
_FORCE_PACK = None
# Forces the pointer forward's multi-sequence tiles (True) or per-sequence tiles (False); None lets the autotuner
# choose on the GPU for sentence-length packs, and takes per-sequence tiles under the interpreter. Tests set it.
_FORCE_MULTI = None


# ----------------------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(p_base, o_r, o_d, stride_r, n_rows, D: tl.constexpr, MASK_R: tl.constexpr, EVEN_D: tl.constexpr):
    # [len(o_r), BD] block of a [rows, D] slab; masks are only built where a block can run off the end
    p = p_base + o_r[:, None] * stride_r + o_d[None, :]
    if MASK_R:
        if EVEN_D:
            b = tl.load(p, mask=(o_r < n_rows)[:, None], other=0.0)
        else:
            b = tl.load(p, mask=(o_r < n_rows)[:, None] & (o_d < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            b = tl.load(p)
        else:
            b = tl.load(p, mask=(o_d < D)[None, :], other=0.0)
    return b


@triton.jit
def _store_rows(p_base, b, o_r, o_d, stride_r, n_rows, D: tl.constexpr, EVEN_D: tl.constexpr):
    p = p_base + o_r[:, None] * stride_r + o_d[None, :]
    if EVEN_D:
        tl.store(p, b, mask=(o_r < n_rows)[:, None])
    else:
        tl.store(p, b, mask=(o_r < n_rows)[:, None] & (o_d < D)[None, :])


@triton.jit
def _load_at(p_rows, m_r, o_d, D: tl.constexpr, EVEN_D: tl.constexpr, MASK_R: tl.constexpr = True):
    # [len(p_rows), BD] block whose rows start at the pointers p_rows (masked by m_r unless MASK_R is False: every
    # row valid): the GQA-packed rows
    if MASK_R:
        if EVEN_D:
            return tl.load(p_rows[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0)
        return tl.load(p_rows[:, None] + o_d[None, :], mask=m_r[:, None] & (o_d < D)[None, :], other=0.0)
    if EVEN_D:
        return tl.load(p_rows[:, None] + o_d[None, :])
    return tl.load(p_rows[:, None] + o_d[None, :], mask=(o_d < D)[None, :], other=0.0)


@triton.jit
def _store_at(p_rows, b, m_r, o_d, D: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(p_rows[:, None] + o_d[None, :], b, mask=m_r[:, None])
    else:
        tl.store(p_rows[:, None] + o_d[None, :], b, mask=m_r[:, None] & (o_d < D)[None, :])


# Tile sets per head-dim class, (BM, BN, num_warps, num_stages). Every set was compiled ahead of time for sm_90 with
# triton 3.9 and ptxas reports no register spills for it except where noted; the autotuner picks among them on the
# card. Forward: BM query rows per program, BN keys per step. Backward: BM query rows and BN key rows per tile (dK/dV
# programs hold BN keys and stream queries; dQ programs hold BM queries and stream keys).
_TILES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
            256: [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)]},
    # (64, 128, 8, 2) and (64, 64, 8, 2) spill 64-80 bytes at D=128 but hold more work per program: candidates
    "dkdv": {64: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
             128: [(32, 128, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2)],
             256: [(32, 32, 4, 2), (32, 64, 8, 2)]},  # D=256 spills 64-240 bytes in both
    "dq": {64: [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2)],
           128: [(128, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)],
           256: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2)]},
}
# Tiles offered for sentences only (length bucket 256): small key blocks for packs whose sequences fill a fraction of a
# 64-key block (wiki1m's sentences average 28 tokens); 82-180 registers, no spills with per-head or packed rows
# (ptxas, sm_90a, triton 3.6), so several programs share an SM and hide each other's load latency. (dK/dV already has
# 32-key tiles; a 32 x 32 one would leave wgmma for mma.sync.)
_SHORT_TILES = {
    "fwd": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)]},
    "dkdv": {},
    "dq": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)]},
}
# Multi-sequence tiles (MULTI, see _fwd_multi, _dq_multi, _dkdv_multi), offered for sentences only: BM consecutive
# rows (dK/dV: BN consecutive keys) of the whole pack, whichever sequences they hold. Shapes of the per-sequence
# tiles above (no new register pressure); whether they beat those on a pack is the autotuner's call.
_MULTI_TILES = {
    "fwd": {64: [(128, 64, 4, 2), (64, 64, 4, 2)], 128: [(128, 64, 8, 2), (64, 64, 4, 2)], 256: []},
    "dkdv": {64: [(64, 64, 8, 2), (32, 64, 4, 2)], 128: [(64, 64, 8, 2), (32, 64, 4, 2)], 256: []},
    "dq": {64: [(128, 64, 8, 2), (64, 64, 4, 2)], 128: [(128, 64, 8, 2), (64, 64, 4, 2)], 256: []},
}
_CLASSES = (64, 128, 256)


def _class_tiles(kind, c, multi=False):
    # the class's tiles, then its sentence-only ones, as (BM, BN, warps, stages, multi-sequence)
    tiles = [(*t, False) for t in _TILES[kind][c] + _SHORT_TILES[kind].get(c, [])]
    return tiles + [(*t, True) for t in _MULTI_TILES[kind][c]] if multi else tiles


def _head_class(bd):
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def _configs(kind, pack=False, multi=False):
    """The autotuner's candidates for one kernel: every head-dim class's tiles, in _CLASSES order. With ``pack`` (the
    pointer forward, dQ and dK/dV) each tile comes twice, PACK False then True: per-head rows, or GQA-packed rows (the G
    query heads of a kv head interleaved token by token in one tile; see _attn_fwd_kernel). With ``multi`` (the
    pointer forward) every config carries MULTI, True for the multi-sequence tiles (_MULTI_TILES)."""
    if INTERPRET:
        # the interpreter cannot autotune: one small tile per kernel, unequal sides (as on the GPU) so that CPU tests
        # cross block edges and the causal diagonal with BM > BN (forward, dQ) and BM < BN (dK/dV); the launchers
        # pass PACK and MULTI themselves (_FORCE_PACK, _FORCE_MULTI)
        BM, BN = (32, 64) if kind == "dkdv" else (64, 32)
        return [triton.Config({"BM": BM, "BN": BN}, num_warps=4, num_stages=1)]
    packs = (False, True) if pack else (None,)
    return [triton.Config({"BM": BM, "BN": BN, **({} if p is None else {"PACK": p}), **({"MULTI": m} if multi else {})},
                          num_warps=w, num_stages=s)
            for c in _CLASSES for BM, BN, w, s, m in _class_tiles(kind, c, multi) for p in packs]


def _prune(kind, pack=False, multi=False):
    # configs arrive as the per-class lists concatenated in _CLASSES order: keep the slice of this head dim
    per_tile = 2 if pack else 1
    sizes = [len(_class_tiles(kind, c, multi)) * per_tile for c in _CLASSES]

    def prune(configs, named_args, **kwargs):
        return _prune_impl(configs, named_args, kwargs)[:_autotune_limit()]

    def _prune_impl(configs, named_args, kwargs):
        if kwargs.get("PREC") == "ieee":
            # exact fp32 runs on FMA units, not tensor cores: larger tiles spill heavily or overflow shared memory
            extra = {} if not pack else {"PACK": bool(_FORCE_PACK)}
            if multi:
                extra["MULTI"] = bool(_FORCE_MULTI) and not kwargs.get("HAS_WINDOW")
            return [triton.Config({"BM": 32, "BN": 32, **extra}, num_warps=4, num_stages=1)]
        bd = kwargs.get("BD", named_args.get("BD"))
        if bd is None or len(configs) != sum(sizes):
            return configs
        k = _CLASSES.index(_head_class(bd))
        start = sum(sizes[:k])
        tiles = configs[start:start + sizes[k]]
        bucket = kwargs.get("SEQ_BUCKET", named_args.get("SEQ_BUCKET"))
        short = bucket is not None and bucket - bucket % 2 == 256  # the length bucket, small pack or not
        if not short:
            only_short = set(_SHORT_TILES[kind].get(_CLASSES[k], []))
            tiles = [c for c in tiles if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) not in only_short]
        if multi:
            # multi-sequence tiles: sentences only, never with a window (the launcher passes SB only then)
            if _FORCE_MULTI is not None:
                want = _FORCE_MULTI and not kwargs.get("HAS_WINDOW")
                # a class without multi-sequence tiles (D=256) keeps its per-sequence ones: never an empty list
                tiles = [c for c in tiles if c.kwargs["MULTI"] == want] or [c for c in tiles if not c.kwargs["MULTI"]]
            elif not short or kwargs.get("HAS_WINDOW"):
                tiles = [c for c in tiles if not c.kwargs["MULTI"]]
        if pack:
            g = named_args.get("G", kwargs.get("G"))
            rank = {id(c): i // 2 for i, c in enumerate(tiles)}  # each tile's index (both layouts listed per tile)
            if _FORCE_PACK is not None:
                tiles = [c for c in tiles if c.kwargs["PACK"] == _FORCE_PACK]
            elif g == 1:
                tiles = [c for c in tiles if not c.kwargs["PACK"]]  # one head per group: both layouts are the same
            # tiles in pairs, each pair per head then packed: a limited tuning run of long sequences tries the first
            # two tiles per head (as before the packed layout existed), then the first packed (LLM2VEC_FAST_AUTOTUNE
            # 2 and 3); sentences reorder below
            tiles = sorted(tiles, key=lambda c: (rank[id(c)] // 2, c.kwargs["PACK"], rank[id(c)]))
        if short:
            # sentences: most rows of a 128 x 128 tile would be past the sequence's end, so the smaller tiles are
            # the likelier winners and come first (what a limited tuning run, LLM2VEC_FAST_AUTOTUNE=2, tries); of
            # one tile, the GQA-packed layout first: it holds G times as many real rows of a short sequence
            tiles = sorted(tiles, key=lambda c: (c.kwargs["BM"] * c.kwargs["BN"], not c.kwargs.get("PACK", False)))
            # and the first multi-sequence tile second, so that a limited tuning run weighs both kinds
            first_multi = next((i for i, c in enumerate(tiles) if c.kwargs.get("MULTI")), None)
            if first_multi is not None and first_multi > 1:
                tiles.insert(1, tiles.pop(first_multi))
        return tiles

    return prune


def _autotune_limit():
    """How many tiles of a class the autotuner may try: LLM2VEC_FAST_AUTOTUNE=1 takes the first (no tuning, for
    time-boxed GPU test runs), =2 the first two; unset, all of them. The lists put the likely winners first."""
    v = os.environ.get("LLM2VEC_FAST_AUTOTUNE", "")
    return max(1, int(v)) if v.isdigit() else None


def _tune_bench(fn, quantiles):
    # shorter than triton's default (25 + 100 ms per config): enough to rank tiles, keeps first calls quick
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# Notes shared by the kernels below.
# - Scores: the raw q·k block is turned into log2-domain logits x = q·k · scale · log2(e), or with a softcap c,
#   x = c · log2(e) · tanh(q·k · scale / c); the launcher folds the constants into `qk_mul` and `cap_mul`.
#   tanh(y) = 1 - 2 / (exp2(2·log2(e)·y) + 1): no libdevice call (works in the interpreter), saturates cleanly.
#   Its derivative 1 - tanh² multiplies dS in the backward.
# - Dropout: the keep decision for (query head h, query token i, key token j), global packed indices, is
#   tl.rand(seed, (h·T + i)·T + j) >= p, so it depends only on (seed, h, i, j, T) and every kernel (and
#   dropout_keep_mask) regenerates the same bits.
# - The GQA group size G is a runtime argument (specialised only when it is 1): one compile serves every GQA ratio
#   of a head dim.
# - Hot loops call few nested @triton.jit helpers (_load_rows, and the forward's _fwd_block): the interpreter
#   re-patches triton.language on every device-function call, which makes CPU tests slower per helper.
# - Causal (CAUSAL): key j of a sequence is visible to its query i when j <= i. The forward and dQ stop at the query
#   block's last row and mask only the blocks crossing the diagonal; dK/dV start at the key block's first row.
# - Local window (HAS_WINDOW): key j of a sequence is visible to query i when i - j <= WIN_L and j - i <= WIN_R
#   (FlashAttention's window_size; the launcher passes the sequence-independent bound T for an unlimited side). Each
#   kernel visits only the blocks that meet the band, every one of them masked; a query row can then meet a block
#   where it sees no key, so the forward guards its online softmax against an all -inf row.
_KEY = ["BD", "G", "HAS_SOFTCAP", "HAS_DROPOUT", "CAUSAL", "HAS_WINDOW", "SEQ_BUCKET"]


def _autotune_kwargs():
    # tuning results go to triton's disk cache (keyed by triton version, GPU arch, kernel source, tuning key and the
    # candidate list), so a machine tunes each case once, not once per process; LLM2VEC_FAST_AUTOTUNE_CACHE=0 opts out
    if os.environ.get("LLM2VEC_FAST_AUTOTUNE_CACHE", "1") == "0":
        return {}
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _autotune(kind, pack=False, multi=False):
    """The autotuner of one attention kernel: ``kind``'s tiles (both row layouts with ``pack``, the multi-sequence
    tiles too with ``multi``), pruned to the head dim's class, keyed by _KEY, timed briefly, results cached on disk."""
    return triton.autotune(configs=_configs(kind, pack, multi), key=_KEY, do_bench=_tune_bench,
                           prune_configs_by={"early_config_prune": _prune(kind, pack, multi)}, **_autotune_kwargs())


@triton.jit
def _key_blocks(t0, t_end, L, WIN_L, WIN_R, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # key range of a query block holding tokens [t0, t_end), (lo, a, b, hi): keys [a, b) come in whole blocks that
    # need no mask, [lo, a) and [b, hi) in blocks that do. Bidirectional: every key, only the partial last block
    # masked. Causal: keys up to the block's last token; a block is mask-free when every key in it is at or before the
    # block's first token. Window: the blocks meeting [t0 - WIN_L, t_end - 1 + WIN_R]; those whose every key every
    # row of the tile sees (keys from t_end - 1 - WIN_L to t0 + WIN_R) need no mask either.
    if CAUSAL:
        hi = tl.minimum(L, t_end)
        n_full = (tl.minimum(t0 + 1, L) // BN) * BN
    else:
        hi = L
        n_full = (L // BN) * BN
    lo = n_full * 0
    a = lo
    b = n_full
    if HAS_WINDOW:
        lo = (tl.maximum(t0 - WIN_L, 0) // BN) * BN
        hi = tl.minimum(hi, t_end + WIN_R)
        a = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(t_end - 1 - WIN_L, 0), BN) * BN), hi)
        b = tl.maximum(a, tl.minimum(((t0 + WIN_R + 1) // BN) * BN, n_full))
    return lo, a, b, hi


@triton.jit
def _query_block(ORDER, CU, G, BM: tl.constexpr, CAUSAL: tl.constexpr, PACK: tl.constexpr):
    # a query-row program's sequence (start, length), query rows (L per head, or L·G GQA-packed), head index on grid
    # axis 1 (query head, or kv head when packed), kv head, block index, and whether the block is empty (the caller
    # returns). Sequences are visited longest first (ORDER), so the long tail of work starts early; causal programs
    # take a sequence's blocks last first (they see the most keys).
    i_m, i_x, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.load(ORDER + i_s)
    bos = tl.load(CU + i_b)
    L = tl.load(CU + i_b + 1) - bos
    if PACK:
        n_rows = L * G
        i_h = i_x
    else:
        n_rows = L
        i_h = i_x // G
    if CAUSAL:
        i_m = tl.cdiv(n_rows, BM) - 1 - i_m
    return bos, L, n_rows, i_x, i_h, i_m, (i_m < 0) | (i_m * BM >= n_rows)


@triton.jit
def _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L, qk_mul, cap_mul, dropout_p, seed,
               WIN_L, WIN_R, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, r_lo=None, r_hi=None,
               SEQ_MASK: tl.constexpr = False):
    # one key block of the forward: scores (log2 units, softcapped), then the online-softmax update that rescales
    # the running sum and accumulator to the new row maximum. Returns (row max, row sum, accumulator). SEQ_MASK (the
    # multi-sequence tiles, absolute token indices): keys outside each row's sequence [r_lo, r_hi) are masked too.
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BM, BN]
    if HAS_SOFTCAP:
        b_s = cap_mul * (1.0 - 2.0 / (tl.exp2(b_s * qk_mul * 2.8853900817779268) + 1.0))
        s_mul = 1.0
    else:
        # the scale goes into the exponent's argument, one FMA per score; the row maximum is taken on the raw scores
        # and scaled once per row (max(s)·c = max(s·c) for c > 0: the launcher rejects scale <= 0)
        s_mul = qk_mul
    if MASK:  # a partial last key block (keys past the sequence end) or, when causal, a block crossing the diagonal
        m_s = (start_n + o_n < L)[None, :]
        if CAUSAL:
            m_s = m_s & (o_m[:, None] >= (start_n + o_n)[None, :])
        if HAS_WINDOW:
            m_s = m_s & (o_m[:, None] - (start_n + o_n)[None, :] <= WIN_L) \
                & ((start_n + o_n)[None, :] - o_m[:, None] <= WIN_R)
        if SEQ_MASK:
            m_s = m_s & ((start_n + o_n)[None, :] >= r_lo[:, None]) & ((start_n + o_n)[None, :] < r_hi[:, None])
        # without a window no row is all -inf here: key 0 (in the first block visited) is visible to every query row
        b_s = tl.where(m_s, b_s, float("-inf"))
    b_mn = tl.maximum(b_mi, tl.max(b_s, 1) * s_mul)
    if HAS_WINDOW or SEQ_MASK:
        # a row that has seen no key yet keeps max -inf (a window's edge, or a block of other sequences' keys):
        # subtract 0 instead, so its p and alpha are 0, not NaN
        b_mz = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s * s_mul - b_mz[:, None])
        b_alpha = tl.exp2(b_mi - b_mz)
    else:
        b_p = tl.exp2(b_s * s_mul - b_mn[:, None])
        b_alpha = tl.exp2(b_mi - b_mn)
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    if HAS_DROPOUT:
        # the normaliser counts every key; only the value mixing is dropped (as torch's SDPA does)
        b_p = tl.where(tl.rand(seed, o_row + (bos64 + start_n + o_n)[None, :]) >= dropout_p, b_p, 0.0)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_mn, b_li, b_acc


@triton.jit
def _fwd_multi(Q, K, V, O, LSE, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
               stride_oh, T, qk_mul, cap_mul, dropout_p, drop_scale, seed, G, D: tl.constexpr, BD: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               CAUSAL: tl.constexpr, PREC: tl.constexpr, PACK: tl.constexpr):
    # The forward of one multi-sequence tile (MULTI): program (i_t, head) holds BM consecutive rows of the whole pack
    # (tokens of one query head, or with PACK the GQA-packed rows t·G + g of a kv head), whatever sequences they
    # belong to, and streams the keys from the first row's sequence start to the last row's sequence end, each score
    # masked to the row's own sequence (SB: every token's sequence start, then its sequence end, absolute indices).
    # For packs of short sentences this replaces many nearly empty per-sequence tiles by few full ones: more scores
    # are computed than used, in far fewer programs.
    i_t, i_x = tl.program_id(0), tl.program_id(1)
    EVEN_D: tl.constexpr = BD == D
    o_r = i_t * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    if PACK:
        m_r = o_r < T * G
        o_t = o_r // G  # each row's token
        o_hq = i_x * G + o_r % G  # and query head
        i_h = i_x
        t_last = tl.minimum(((i_t + 1) * BM - 1) // G, T - 1)
        t_first = i_t * BM // G
    else:
        m_r = o_r < T
        o_t = o_r
        o_hq = i_x
        i_h = i_x // G
        t_last = tl.minimum((i_t + 1) * BM - 1, T - 1)
        t_first = i_t * BM
    o_t64 = tl.minimum(o_t, T - 1).to(tl.int64)  # rows past the pack read the last token's bounds (never stored)
    b_lo = tl.load(SB + o_t64)  # [BM] each row's sequence [start, end)
    b_hi = tl.load(SB + T + o_t64)
    k_lo = tl.load(SB + t_first)
    k_hi = tl.load(SB + T + t_last)
    b_q = _load_at(Q + o_t64 * stride_qt + o_hq * stride_qh, m_r, o_d, D, EVEN_D)  # [BM, BD]
    o_row = ((o_hq * T + o_t64) * T)[:, None]  # dropout counter base per query row
    p_k = K + i_h * stride_kh
    p_v = V + i_h * stride_vh
    o_n0 = tl.arange(0, BN)

    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for start_n in range(k_lo, k_hi, BN):
        o_n = (start_n + o_n0).to(tl.int64)
        b_k = _load_rows(p_k, o_n, o_d, stride_kt, k_hi, D, True, EVEN_D)  # [BN, BD]
        b_v = _load_rows(p_v, o_n, o_d, stride_vt, k_hi, D, True, EVEN_D)
        # absolute indices: no base offset, keys past k_hi masked as past a sequence's end
        b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_t, o_n0, o_row, 0, k_hi, qk_mul,
                                       cap_mul, dropout_p, seed, 0, 0, True, CAUSAL, False, HAS_SOFTCAP, HAS_DROPOUT,
                                       PREC, b_lo, b_hi, True)

    # every row sees at least its own token's key (its sequence lies inside [k_lo, k_hi)): b_li > 0
    b_acc = (b_acc * (drop_scale / b_li)[:, None]).to(O.dtype.element_ty)
    b_lse = (b_mi + tl.log2(b_li)) * 0.6931471805599453
    _store_at(O + o_t64 * stride_ot + o_hq * stride_oh, b_acc, m_r, o_d, D, EVEN_D)
    tl.store(LSE + o_hq * T + o_t64, b_lse, mask=m_r)


@_autotune("fwd", pack=True, multi=True)
@triton.jit(do_not_specialize=["T", "seed", "SEQ_BUCKET"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU, ORDER, SB,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, qk_mul, cap_mul, dropout_p, drop_scale, seed, SEQ_BUCKET, WIN_L, WIN_R,
    G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr, PACK: tl.constexpr, MULTI: tl.constexpr,
):
    if MULTI:  # tiles of consecutive rows of the whole pack, several short sequences each
        _fwd_multi(Q, K, V, O, LSE, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
                   stride_oh, T, qk_mul, cap_mul, dropout_p, drop_scale, seed, G, D, BD, BM, BN, HAS_SOFTCAP,
                   HAS_DROPOUT, CAUSAL, PREC, PACK)
    else:
        # Row layouts. Per-head (PACK False): program (i_m, query head, sequence) holds BM tokens of one query
        # head. GQA-packed (PACK True): program (i_m, kv head, sequence) holds BM rows of the L·G rows (token t,
        # head g) of the kv head's G query heads, row r = t·G + g: a short sequence fills its tiles G times better,
        # and each K/V block loaded serves G heads.
        bos, L, n_rows, i_x, i_h, i_m, empty = _query_block(ORDER, CU, G, BM, CAUSAL, PACK)
        if empty:
            return
        EVEN_D: tl.constexpr = BD == D

        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        bos64 = bos.to(tl.int64)
        p_k = K + bos64 * stride_kt + i_h * stride_kh
        p_v = V + bos64 * stride_vt + i_h * stride_vh
        if PACK:
            o_r = i_m * BM + tl.arange(0, BM)
            m_r = o_r < n_rows
            o_m = o_r // G  # each row's token
            o_hq = i_h * G + o_r % G  # and query head
            b_q = _load_at(Q + (bos64 + o_m) * stride_qt + o_hq * stride_qh, m_r, o_d, D, EVEN_D)  # [BM, BD]
            o_row = ((o_hq * T + bos64 + o_m) * T)[:, None]  # dropout counter base per query row
            t0 = i_m * BM // G
            t_end = ((i_m + 1) * BM - 1) // G + 1
        else:
            o_m = i_m * BM + tl.arange(0, BM)
            b_q = _load_rows(Q + bos64 * stride_qt + i_x * stride_qh, o_m, o_d, stride_qt, L, D, True, EVEN_D)
            o_row = ((i_x * T + bos64 + o_m) * T)[:, None]
            t0 = i_m * BM
            t_end = t0 + BM

        b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_li = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, BD], dtype=tl.float32)

        # full key blocks load without masks; only the last, partial block (and, when causal, the blocks crossing the
        # diagonal) pay for them
        lo, full_lo, full_hi, hi = _key_blocks(t0, t_end, L, WIN_L, WIN_R, BN, CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:  # the band's first blocks, partly outside it
            for start_n in range(lo, full_lo, BN):
                b_k = _load_rows(p_k + start_n * stride_kt, o_n, o_d, stride_kt, L - start_n, D, True, EVEN_D)
                b_v = _load_rows(p_v + start_n * stride_vt, o_n, o_d, stride_vt, L - start_n, D, True, EVEN_D)
                b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L,
                                               qk_mul, cap_mul, dropout_p, seed, WIN_L, WIN_R, True, CAUSAL, HAS_WINDOW,
                                               HAS_SOFTCAP, HAS_DROPOUT, PREC)
        for start_n in range(full_lo, full_hi, BN):
            b_k = _load_rows(p_k + start_n * stride_kt, o_n, o_d, stride_kt, L, D, False, EVEN_D)  # [BN, BD]
            b_v = _load_rows(p_v + start_n * stride_vt, o_n, o_d, stride_vt, L, D, False, EVEN_D)  # [BN, BD]
            b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L, qk_mul,
                                           cap_mul, dropout_p, seed, WIN_L, WIN_R, False, CAUSAL, HAS_WINDOW,
                                           HAS_SOFTCAP, HAS_DROPOUT, PREC)
        for start_n in range(full_hi, hi, BN):
            b_k = _load_rows(p_k + start_n * stride_kt, o_n, o_d, stride_kt, L - start_n, D, True, EVEN_D)
            b_v = _load_rows(p_v + start_n * stride_vt, o_n, o_d, stride_vt, L - start_n, D, True, EVEN_D)
            b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L, qk_mul,
                                           cap_mul, dropout_p, seed, WIN_L, WIN_R, True, CAUSAL, HAS_WINDOW,
                                           HAS_SOFTCAP, HAS_DROPOUT, PREC)

        b_acc = (b_acc * (drop_scale / b_li)[:, None]).to(O.dtype.element_ty)
        # natural-log lse of the *undropped* softmax: what the backward needs to rebuild P
        b_lse = (b_mi + tl.log2(b_li)) * 0.6931471805599453
        if PACK:
            _store_at(O + (bos64 + o_m) * stride_ot + o_hq * stride_oh, b_acc, m_r, o_d, D, EVEN_D)
            tl.store(LSE + o_hq * T + bos64 + o_m, b_lse, mask=m_r)
        else:
            _store_rows(O + bos64 * stride_ot + i_x * stride_oh, b_acc, o_m, o_d, stride_ot, L, D, EVEN_D)
            tl.store(LSE + i_x * T + bos64 + o_m, b_lse, mask=o_m < L)


@_autotune("fwd")
@triton.jit(do_not_specialize=["T", "seed", "SEQ_BUCKET"])
def _attn_fwd_tma_kernel(
    Q, K, V, O, LSE, CU, ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, qk_mul, cap_mul, dropout_p, drop_scale, seed, SEQ_BUCKET, WIN_L, WIN_R,
    G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    # The forward with Hopper TMA loads: one [L, D] tensor descriptor per (sequence, head), so tiles stream through
    # the copy engine (pipelined, no per-element pointers in registers) and rows past the sequence end arrive as
    # zeros. Same math as _attn_fwd_kernel; head dims that are powers of two only (BD == D).
    bos, L, n_rows, i_hq, i_h, i_m, empty = _query_block(ORDER, CU, G, BM, CAUSAL, False)
    if empty:
        return
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    bos64 = bos.to(tl.int64)
    d_q = tl.make_tensor_descriptor(Q + bos64 * stride_qt + i_hq * stride_qh, [L, D], [stride_qt, 1], [BM, BD])
    d_k = tl.make_tensor_descriptor(K + bos64 * stride_kt + i_h * stride_kh, [L, D], [stride_kt, 1], [BN, BD])
    d_v = tl.make_tensor_descriptor(V + bos64 * stride_vt + i_h * stride_vh, [L, D], [stride_vt, 1], [BN, BD])
    b_q = d_q.load([i_m * BM, 0])  # [BM, BD]

    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    o_row = ((i_hq * T + bos64 + o_m) * T)[:, None]

    # the launcher takes the pointer kernel for a window: here HAS_WINDOW is False and the key range starts at 0
    _, full_lo, full_hi, hi = _key_blocks(i_m * BM, (i_m + 1) * BM, L, WIN_L, WIN_R, BN, CAUSAL, HAS_WINDOW)
    for start_n in range(full_lo, full_hi, BN):
        b_k = d_k.load([start_n, 0])  # [BN, BD]
        b_v = d_v.load([start_n, 0])
        b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L, qk_mul,
                                       cap_mul, dropout_p, seed, WIN_L, WIN_R, False, CAUSAL, HAS_WINDOW,
                                       HAS_SOFTCAP, HAS_DROPOUT, PREC)
    for start_n in range(full_hi, hi, BN):
        b_k = d_k.load([start_n, 0])  # zero rows past L: their scores are masked below, their values never mix
        b_v = d_v.load([start_n, 0])
        b_mi, b_li, b_acc = _fwd_block(b_q, b_k, b_v, b_mi, b_li, b_acc, start_n, o_m, o_n, o_row, bos64, L, qk_mul,
                                       cap_mul, dropout_p, seed, WIN_L, WIN_R, True, CAUSAL, HAS_WINDOW,
                                       HAS_SOFTCAP, HAS_DROPOUT, PREC)

    b_acc = b_acc * (drop_scale / b_li)[:, None]
    # a masked pointer store: a descriptor store would clip at L too, but stores are once per program anyway
    _store_rows(O + bos64 * stride_ot + i_hq * stride_oh, b_acc.to(O.dtype.element_ty), o_m, o_d, stride_ot, L, D,
                True)
    b_lse = (b_mi + tl.log2(b_li)) * 0.6931471805599453
    tl.store(LSE + i_hq * T + bos64 + o_m, b_lse, mask=o_m < L)


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    # delta_i = rowsum(dO_i ∘ O_i) = rowsum(dP̃ ∘ P̃): the softmax-backward correction, also right under dropout
    i_t, i_hq = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m = (o_t < T)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(O + o_t[:, None].to(tl.int64) * stride_ot + i_hq * stride_oh + o_d[None, :], mask=m, other=0.0)
    b_do = tl.load(DO + o_t[:, None].to(tl.int64) * stride_dot + i_hq * stride_doh + o_d[None, :], mask=m, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(DELTA + i_hq * T + o_t, b_delta, mask=o_t < T)


@triton.jit
def _dkdv_block(b_k, b_v, b_q, b_do, b_dk, b_dv, LSE, DELTA, o_stat, m_m, o_m, o_n, o_drop, qk_mul, cap_mul, dropout_p,
                drop_scale, seed, WIN_L, WIN_R, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, MASK_M: tl.constexpr,
                kb_lo=None, kb_hi=None, SEQ_MASK: tl.constexpr = False):
    # one query block's contribution to a key block's dK/dV: o_stat indexes the rows' lse and delta ([Hq, T] flat),
    # o_m holds each row's token (causal mask), o_drop the dropout counters [BN, BM]; MASK_M: the block runs past
    # the sequence's last row (m_m), whose padded rows get lse = +inf so that their P is exactly 0; SEQ_MASK (the
    # multi-sequence tiles, absolute token indices): a row outside its key's sequence [kb_lo, kb_hi) gets P = 0
    if MASK_M:
        b_lse2 = tl.load(LSE + o_stat, mask=m_m, other=float("inf")) * 1.4426950408889634
        b_delta = tl.load(DELTA + o_stat, mask=m_m, other=0.0)
    else:
        b_lse2 = tl.load(LSE + o_stat) * 1.4426950408889634
        b_delta = tl.load(DELTA + o_stat)
    # transposed tiles ([BN, BM]: keys × queries) so that P^T and dS^T come out of the MMAs already in the
    # A-operand orientation of the dV and dK products: no register transposes through shared memory
    b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [BN, BM]
    if HAS_SOFTCAP:
        b_tT = 1.0 - 2.0 / (tl.exp2(b_sT * qk_mul * 2.8853900817779268) + 1.0)
        b_pT = tl.exp2(cap_mul * b_tT - b_lse2[None, :])
    else:
        b_pT = tl.exp2(b_sT * qk_mul - b_lse2[None, :])
    if SEQ_MASK:
        b_pT = tl.where((o_m[None, :] >= kb_lo[:, None]) & (o_m[None, :] < kb_hi[:, None]), b_pT, 0.0)
    if CAUSAL:
        b_pT = tl.where(o_m[None, :] >= o_n[:, None], b_pT, 0.0)
    if HAS_WINDOW:
        b_pT = tl.where((o_m[None, :] - o_n[:, None] <= WIN_L) & (o_n[:, None] - o_m[None, :] <= WIN_R), b_pT, 0.0)
    b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BN, BM]
    if HAS_DROPOUT:
        b_keep = tl.rand(seed, o_drop) >= dropout_p
        b_pdT = tl.where(b_keep, b_pT * drop_scale, 0.0)
        b_dpT = tl.where(b_keep, b_dpT * drop_scale, 0.0)
    else:
        b_pdT = b_pT
    b_dv += tl.dot(b_pdT.to(b_do.dtype), b_do, input_precision=PREC)
    b_dsT = b_pT * (b_dpT - b_delta[None, :])
    if HAS_SOFTCAP:
        b_dsT = b_dsT * (1.0 - b_tT * b_tT)
    b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def _multi_rows(SB, i_t, T, G, BM: tl.constexpr, PACK: tl.constexpr):
    # the rows of a multi-sequence row tile: (valid, token as int64, query head offset in the group or None-like 0,
    # first token, last token); rows past the pack read the last token (never stored)
    o_r = i_t * BM + tl.arange(0, BM)
    if PACK:
        m_r = o_r < T * G
        o_t = o_r // G
        o_g = o_r % G
        t_first = i_t * BM // G
        t_last = tl.minimum(((i_t + 1) * BM - 1) // G, T - 1)
    else:
        m_r = o_r < T
        o_t = o_r
        o_g = o_r * 0
        t_first = i_t * BM
        t_last = tl.minimum((i_t + 1) * BM - 1, T - 1)
    return m_r, tl.minimum(o_t, T - 1).to(tl.int64), o_g, t_first, t_last


@triton.jit
def _dq_multi(Q, K, V, DO, LSE, DELTA, DQ, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_dot, stride_doh, stride_dqt, stride_dqh, T, qk_mul, cap_mul, scale, dropout_p, drop_scale, seed,
              G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, PACK: tl.constexpr):
    # dQ of one multi-sequence row tile (see _fwd_multi): P rebuilt from the lse, every score masked to the row's own
    # sequence
    i_t, i_x = tl.program_id(0), tl.program_id(1)
    EVEN_D: tl.constexpr = BD == D
    m_r, o_t, o_g, t_first, t_last = _multi_rows(SB, i_t, T, G, BM, PACK)
    if PACK:
        o_hq = i_x * G + o_g
        i_h = i_x
    else:
        o_hq = i_x + o_g  # o_g is 0: the program's query head
        i_h = i_x // G
    o_d = tl.arange(0, BD)
    b_lo = tl.load(SB + o_t)
    b_hi = tl.load(SB + T + o_t)
    k_lo = tl.load(SB + t_first)
    k_hi = tl.load(SB + T + t_last)
    b_q = _load_at(Q + o_t * stride_qt + o_hq * stride_qh, m_r, o_d, D, EVEN_D)
    b_do = _load_at(DO + o_t * stride_dot + o_hq * stride_doh, m_r, o_d, D, EVEN_D)
    b_lse2 = tl.load(LSE + o_hq * T + o_t) * 1.4426950408889634
    b_delta = tl.load(DELTA + o_hq * T + o_t)
    o_row = ((o_hq * T + o_t) * T)[:, None]
    p_k = K + i_h * stride_kh
    p_v = V + i_h * stride_vh
    o_n0 = tl.arange(0, BN)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for start_n in range(k_lo, k_hi, BN):
        # keys past k_hi masked as past a sequence's end (L = k_hi, no base offset: indices are absolute)
        b_dq = _dq_block(b_q, b_do, b_dq, b_lse2, b_delta, p_k, p_v, (start_n + o_n0).to(tl.int64), o_t, o_row, o_d, 0,
                         k_hi, stride_kt, stride_vt, qk_mul, cap_mul, dropout_p, drop_scale, seed, 0, 0, True, CAUSAL,
                         False, HAS_SOFTCAP, HAS_DROPOUT, D, EVEN_D, PREC, b_lo, b_hi, True)
    b_dq = (b_dq * scale).to(DQ.dtype.element_ty)
    _store_at(DQ + o_t * stride_dqt + o_hq * stride_dqh, b_dq, m_r, o_d, D, EVEN_D)


@triton.jit
def _dkdv_multi(Q, K, V, DO, LSE, DELTA, DK, DV, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, T, qk_mul, cap_mul, scale,
                dropout_p, drop_scale, seed, G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr, PACK: tl.constexpr):
    # dK/dV of one multi-sequence key tile: BN consecutive tokens of the whole pack, one kv head; the query rows of
    # the G heads of its group are streamed from the first key's sequence start to the last key's sequence end, each
    # P^T entry masked to the key's own sequence (transposed tiles, as in _dkdv_block)
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    EVEN_D: tl.constexpr = BD == D
    o_n_raw = i_t * BN + tl.arange(0, BN)
    m_n = o_n_raw < T
    o_n = tl.minimum(o_n_raw, T - 1).to(tl.int64)  # keys past the pack read the last token (never stored)
    o_d = tl.arange(0, BD)
    kb_lo = tl.load(SB + o_n)
    kb_hi = tl.load(SB + T + o_n)
    q_lo = tl.load(SB + i_t * BN)
    q_hi = tl.load(SB + T + tl.minimum(i_t * BN + BN - 1, T - 1))
    b_k = _load_at(K + o_n * stride_kt + i_h * stride_kh, m_n, o_d, D, EVEN_D)  # [BN, BD]
    b_v = _load_at(V + o_n * stride_vt + i_h * stride_vh, m_n, o_d, D, EVEN_D)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    o_m0 = tl.arange(0, BM)
    if PACK:
        n_groups = 1
        r_lo = q_lo * G
        r_hi = q_hi * G
    else:
        n_groups = G
        r_lo = q_lo
        r_hi = q_hi
    for g in range(n_groups):
        for start_m in range(r_lo, r_hi, BM):
            o_r = start_m + o_m0
            m_m = o_r < r_hi
            if PACK:
                o_m = (o_r // G).to(tl.int64)  # each row's token
                o_hq = i_h * G + o_r % G  # and query head
            else:
                o_m = o_r.to(tl.int64)
                o_hq = i_h * G + g + o_r * 0
            o_mc = tl.minimum(o_m, T - 1)
            b_q = _load_at(Q + o_mc * stride_qt + o_hq * stride_qh, m_m, o_d, D, EVEN_D)  # [BM, BD]
            b_do = _load_at(DO + o_mc * stride_dot + o_hq * stride_doh, m_m, o_d, D, EVEN_D)
            # rows past the tile's rows get lse = +inf in the block: P exactly 0
            b_dk, b_dv = _dkdv_block(b_k, b_v, b_q, b_do, b_dk, b_dv, LSE, DELTA, o_hq * T + o_mc, m_m, o_m, o_n,
                                     ((o_hq * T + o_m) * T)[None, :] + o_n[:, None], qk_mul, cap_mul, dropout_p,
                                     drop_scale, seed, 0, 0, CAUSAL, False, HAS_SOFTCAP, HAS_DROPOUT, PREC, True,
                                     kb_lo, kb_hi, True)
    b_dk = b_dk * scale
    _store_at(DK + o_n * stride_dkt + i_h * stride_dkh, b_dk.to(DK.dtype.element_ty), m_n, o_d, D, EVEN_D)
    _store_at(DV + o_n * stride_dvt + i_h * stride_dvh, b_dv.to(DV.dtype.element_ty), m_n, o_d, D, EVEN_D)


@_autotune("dkdv", pack=True, multi=True)
@triton.jit(do_not_specialize=["T", "seed", "SEQ_BUCKET"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, ORDER, SB,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    T, qk_mul, cap_mul, scale, dropout_p, drop_scale, seed, SEQ_BUCKET, WIN_L, WIN_R,
    G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr, PACK: tl.constexpr, MULTI: tl.constexpr,
):
    if MULTI:  # key tiles of consecutive tokens of the whole pack, several short sequences each
        _dkdv_multi(Q, K, V, DO, LSE, DELTA, DK, DV, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                    stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, T, qk_mul,
                    cap_mul, scale, dropout_p, drop_scale, seed, G, D, BD, BM, BN, HAS_SOFTCAP, HAS_DROPOUT, CAUSAL,
                    PREC, PACK)
    else:
        # one program owns BN keys of one kv head and streams the queries of the G query heads of its group: dK/dV
        # are summed in registers, no atomics, deterministic. Per head (PACK False): G passes over the L query
        # tokens. GQA-packed (PACK True): one pass over the L·G rows (token t, head g), row r = t·G + g, as in the
        # forward: fewer, fuller query blocks for short sequences.
        i_n, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b = tl.load(ORDER + i_s)
        bos = tl.load(CU + i_b)
        L = tl.load(CU + i_b + 1) - bos
        if i_n * BN >= L:
            return
        EVEN_D: tl.constexpr = BD == D
        o_n = i_n * BN + tl.arange(0, BN)
        o_m0 = tl.arange(0, BM)
        o_d = tl.arange(0, BD)
        bos64 = bos.to(tl.int64)

        # [BN, BD]
        b_k = _load_rows(K + bos64 * stride_kt + i_h * stride_kh, o_n, o_d, stride_kt, L, D, True, EVEN_D)
        b_v = _load_rows(V + bos64 * stride_vt + i_h * stride_vh, o_n, o_d, stride_vt, L, D, True, EVEN_D)
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
        o_col = (bos64 + o_n)[:, None]
        # the query tokens that can see this key block: [t_lo, t_hi)
        t_lo = i_n * BN * 0
        t_hi = L
        if CAUSAL:  # tokens before this key block never see it
            t_lo = i_n * BN
        if HAS_WINDOW:
            t_lo = tl.maximum(t_lo, i_n * BN - WIN_R)
            t_hi = tl.minimum(L, i_n * BN + BN + WIN_L)

        # query blocks wholly inside the sequence ([lo, mid)) load their rows, lse and delta without masks; only the
        # block running past the last row ([mid, hi)) pays for them: two passes, MASKED a compile-time 0 then 1
        if PACK:
            lo = (t_lo * G // BM) * BM
            hi = t_hi * G
            mid = tl.maximum(lo, tl.minimum(tl.cdiv(hi, BM) * BM, (L * G // BM) * BM))
            for MASKED in tl.static_range(2):
                for start_m in range(mid if MASKED else lo, hi if MASKED else mid, BM):
                    o_r = start_m + o_m0
                    m_m = o_r < L * G
                    o_m = o_r // G  # each row's token
                    o_hq = i_h * G + o_r % G  # and query head
                    b_q = _load_at(Q + (bos64 + o_m) * stride_qt + o_hq * stride_qh, m_m, o_d, D, EVEN_D, MASKED == 1)
                    b_do = _load_at(DO + (bos64 + o_m) * stride_dot + o_hq * stride_doh, m_m, o_d, D, EVEN_D,
                                    MASKED == 1)
                    b_dk, b_dv = _dkdv_block(b_k, b_v, b_q, b_do, b_dk, b_dv, LSE, DELTA, o_hq * T + bos64 + o_m, m_m,
                                             o_m, o_n, ((o_hq * T + bos64 + o_m) * T)[None, :] + o_col, qk_mul,
                                             cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, CAUSAL, HAS_WINDOW,
                                             HAS_SOFTCAP, HAS_DROPOUT, PREC, MASKED == 1)
        else:
            lo = (t_lo // BM) * BM
            mid = tl.maximum(lo, tl.minimum(tl.cdiv(t_hi, BM) * BM, (L // BM) * BM))
            for g in range(G):
                i_hq = i_h * G + g
                p_q = Q + bos64 * stride_qt + i_hq * stride_qh
                p_do = DO + bos64 * stride_dot + i_hq * stride_doh
                for MASKED in tl.static_range(2):
                    for start_m in range(mid if MASKED else lo, t_hi if MASKED else mid, BM):
                        o_m = start_m + o_m0
                        b_q = _load_rows(p_q, o_m, o_d, stride_qt, L, D, MASKED == 1, EVEN_D)  # [BM, BD]
                        b_do = _load_rows(p_do, o_m, o_d, stride_dot, L, D, MASKED == 1, EVEN_D)  # [BM, BD]
                        b_dk, b_dv = _dkdv_block(b_k, b_v, b_q, b_do, b_dk, b_dv, LSE, DELTA, i_hq * T + bos64 + o_m,
                                                 o_m < L, o_m, o_n, ((i_hq * T + bos64 + o_m) * T)[None, :] + o_col,
                                                 qk_mul, cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, CAUSAL,
                                                 HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, PREC, MASKED == 1)

        b_dk = b_dk * scale
        _store_rows(DK + bos64 * stride_dkt + i_h * stride_dkh, b_dk.to(DK.dtype.element_ty), o_n, o_d, stride_dkt, L,
                    D, EVEN_D)
        _store_rows(DV + bos64 * stride_dvt + i_h * stride_dvh, b_dv.to(DV.dtype.element_ty), o_n, o_d, stride_dvt, L,
                    D, EVEN_D)


@triton.jit
def _dq_block(b_q, b_do, b_dq, b_lse2, b_delta, p_k, p_v, o_n, o_m, o_row, o_d, bos64, L, stride_kt, stride_vt, qk_mul,
              cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, MASK: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, D: tl.constexpr,
              EVEN_D: tl.constexpr, PREC: tl.constexpr, r_lo=None, r_hi=None, SEQ_MASK: tl.constexpr = False):
    # one key block's contribution to a query block's dQ (P rebuilt from the lse); MASK: keys past the sequence end,
    # after the query (causal) or outside its window are zeroed, else the block is whole and visible to every row;
    # SEQ_MASK (the multi-sequence tiles, absolute token indices): keys outside each row's sequence [r_lo, r_hi) too
    b_k = _load_rows(p_k, o_n, o_d, stride_kt, L, D, MASK, EVEN_D)  # [BN, BD]
    b_v = _load_rows(p_v, o_n, o_d, stride_vt, L, D, MASK, EVEN_D)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BM, BN]
    if HAS_SOFTCAP:
        b_t = 1.0 - 2.0 / (tl.exp2(b_s * qk_mul * 2.8853900817779268) + 1.0)
        b_p = tl.exp2(cap_mul * b_t - b_lse2[:, None])
    else:
        b_p = tl.exp2(b_s * qk_mul - b_lse2[:, None])
    if MASK:
        m_p = (o_n < L)[None, :]
        if CAUSAL:
            m_p = m_p & (o_m[:, None] >= o_n[None, :])
        if HAS_WINDOW:
            m_p = m_p & (o_m[:, None] - o_n[None, :] <= WIN_L) & (o_n[None, :] - o_m[:, None] <= WIN_R)
        if SEQ_MASK:
            m_p = m_p & (o_n[None, :] >= r_lo[:, None]) & (o_n[None, :] < r_hi[:, None])
        b_p = tl.where(m_p, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    if HAS_DROPOUT:
        b_keep = tl.rand(seed, o_row + (bos64 + o_n)[None, :]) >= dropout_p
        b_dp = tl.where(b_keep, b_dp * drop_scale, 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])
    if HAS_SOFTCAP:
        b_ds = b_ds * (1.0 - b_t * b_t)
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)


@_autotune("dq", pack=True, multi=True)
@triton.jit(do_not_specialize=["T", "seed", "SEQ_BUCKET"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, ORDER, SB,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    T, qk_mul, cap_mul, scale, dropout_p, drop_scale, seed, SEQ_BUCKET, WIN_L, WIN_R,
    G, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr, PACK: tl.constexpr, MULTI: tl.constexpr,
):
    if MULTI:  # row tiles of the whole pack, as the forward's
        _dq_multi(Q, K, V, DO, LSE, DELTA, DQ, SB, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_dot, stride_doh, stride_dqt, stride_dqh, T, qk_mul, cap_mul, scale, dropout_p, drop_scale,
                  seed, G, D, BD, BM, BN, HAS_SOFTCAP, HAS_DROPOUT, CAUSAL, PREC, PACK)
    else:
        # dQ in its own pass (recomputing P) instead of atomics into dQ from the dK/dV programs: deterministic. Rows
        # per head or GQA-packed, as in the forward (PACK).
        bos, L, n_rows, i_x, i_h, i_m, empty = _query_block(ORDER, CU, G, BM, CAUSAL, PACK)
        if empty:
            return
        EVEN_D: tl.constexpr = BD == D
        o_r = i_m * BM + tl.arange(0, BM)
        o_n0 = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        m_r = o_r < n_rows
        bos64 = bos.to(tl.int64)
        if PACK:
            o_m = o_r // G  # each row's token
            o_hq = i_h * G + o_r % G  # and query head
            b_q = _load_at(Q + (bos64 + o_m) * stride_qt + o_hq * stride_qh, m_r, o_d, D, EVEN_D)
            b_do = _load_at(DO + (bos64 + o_m) * stride_dot + o_hq * stride_doh, m_r, o_d, D, EVEN_D)
            t0 = i_m * BM // G
            t_end = ((i_m + 1) * BM - 1) // G + 1
        else:
            o_m = o_r
            o_hq = i_x
            b_q = _load_rows(Q + bos64 * stride_qt + i_x * stride_qh, o_m, o_d, stride_qt, L, D, True, EVEN_D)
            b_do = _load_rows(DO + bos64 * stride_dot + i_x * stride_doh, o_m, o_d, stride_dot, L, D, True, EVEN_D)
            t0 = i_m * BM
            t_end = (i_m + 1) * BM
        b_lse2 = tl.load(LSE + o_hq * T + bos64 + o_m, mask=m_r, other=float("inf")) * 1.4426950408889634
        b_delta = tl.load(DELTA + o_hq * T + bos64 + o_m, mask=m_r, other=0.0)
        b_dq = tl.zeros([BM, BD], dtype=tl.float32)
        p_k = K + bos64 * stride_kt + i_h * stride_kh
        p_v = V + bos64 * stride_vt + i_h * stride_vh
        o_row = ((o_hq * T + bos64 + o_m) * T)[:, None]

        # whole blocks every row sees load and score without masks; the band's edges (a window), the diagonal (causal)
        # and the partial last block are masked
        lo, full_lo, full_hi, hi = _key_blocks(t0, t_end, L, WIN_L, WIN_R, BN, CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            for start_n in range(lo, full_lo, BN):
                b_dq = _dq_block(b_q, b_do, b_dq, b_lse2, b_delta, p_k, p_v, start_n + o_n0, o_m, o_row, o_d, bos64, L,
                                 stride_kt, stride_vt, qk_mul, cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, True,
                                 CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, D, EVEN_D, PREC)
        for start_n in range(full_lo, full_hi, BN):
            b_dq = _dq_block(b_q, b_do, b_dq, b_lse2, b_delta, p_k, p_v, start_n + o_n0, o_m, o_row, o_d, bos64, L,
                             stride_kt, stride_vt, qk_mul, cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, False,
                             CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, D, EVEN_D, PREC)
        for start_n in range(full_hi, hi, BN):
            b_dq = _dq_block(b_q, b_do, b_dq, b_lse2, b_delta, p_k, p_v, start_n + o_n0, o_m, o_row, o_d, bos64, L,
                             stride_kt, stride_vt, qk_mul, cap_mul, dropout_p, drop_scale, seed, WIN_L, WIN_R, True,
                             CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, D, EVEN_D, PREC)

        b_dq = (b_dq * scale).to(DQ.dtype.element_ty)
        if PACK:
            _store_at(DQ + (bos64 + o_m) * stride_dqt + o_hq * stride_dqh, b_dq, m_r, o_d, D, EVEN_D)
        else:
            _store_rows(DQ + bos64 * stride_dqt + i_x * stride_dqh, b_dq, o_m, o_d, stride_dqt, L, D, EVEN_D)


@triton.jit(do_not_specialize=["T", "seed"])
def _dropout_mask_kernel(M, T, dropout_p, seed, BM: tl.constexpr, BN: tl.constexpr):
    # materialises the kernels' own keep-mask over all (head, query, key) pairs: a test and debugging aid
    i_m, i_n, i_hq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    b_keep = tl.rand(seed, ((i_hq * T + o_m) * T)[:, None] + o_n[None, :]) >= dropout_p
    tl.store(M + (i_hq * T + o_m[:, None]) * T + o_n[None, :], b_keep.to(tl.int8),
             mask=(o_m < T)[:, None] & (o_n < T)[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# 2. Launchers
# ----------------------------------------------------------------------------------------------------------------------
def _empty(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# packs of at most this many tokens are tuned apart from larger ones (see _seq_bucket)
SMALL_PACK = 8192


def _seq_bucket(length: int, total_tokens: int) -> int:
    # autotune key: tiles that win on 100-token sentences lose on 8k documents (three length buckets, 256 / 1024 /
    # 8192), and a small pack (a first encode batch, a GradCache chunk: few programs on the card) can favour other
    # tiles than a 64k-token one, so it is its own bucket (+1): whichever pack first meets a key picks its tiles.
    # `length` is the pack's work-weighted length (see _work_length) where flash_attention computed it, else its
    # longest sequence
    base = 256 if length <= 256 else 1024 if length <= 1024 else 8192
    return base + (1 if total_tokens <= SMALL_PACK else 0)


def _scalars(scale, softcap, dropout_p):
    if softcap > 0:
        qk_mul, cap_mul = scale / softcap, softcap * LOG2E
    else:
        qk_mul, cap_mul = scale * LOG2E, 1.0
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return float(qk_mul), float(cap_mul), float(drop_scale)


def _check_layout(name, x):
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(x.stride())}")


def _use_tma(q, *others):
    """Whether the forward takes the TMA-descriptor kernel: opt-in (LLM2VEC_FAST_ATTN_TMA=1 or ``_FORCE_TMA``) until
    the GPU benchmark shows it ahead; Hopper or newer, 16-bit inputs, power-of-two head dims, 16-byte aligned rows."""
    if not (_FORCE_TMA or os.environ.get("LLM2VEC_FAST_ATTN_TMA") == "1") or not hasattr(tl, "make_tensor_descriptor"):
        return False
    D = q.shape[-1]
    if D != next_power_of_2(D) or q.dtype == torch.float32:
        return False
    # TMA needs 16-byte aligned bases and row strides (the kernel's per-sequence bases inherit it from the strides)
    if any(x.data_ptr() % 16 or any(st % 8 for st in x.stride()[:-1]) for x in (q, *others)):
        return False
    if not INTERPRET and (not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    return True


def _tma_alloc(size, alignment, stream):
    # scratch for descriptors built on the device (128 bytes per program)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator():
    if not INTERPRET:
        triton.set_allocator(_tma_alloc)


def _window_args(window_size, T):
    # (HAS_WINDOW, WIN_L, WIN_R): an unlimited side (-1), or one of T or more, becomes T, which no in-sequence
    # distance reaches (and keeps i + WIN_R far from int64 overflow in the kernels); both unlimited: no window
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    left, right = (T if w < 0 or w >= T else w for w in (left, right))
    return left < T or right < T, left, right


def attention_fwd(q, k, v, cu_seqlens, max_seqlen, order, scale, softcap, dropout_p, seed, causal=False, tune_len=None,
                  window_size=None):
    """Launch the forward kernel. Returns (o [T, Hq, D], lse [Hq, T] fp32). Inputs are assumed validated;
    ``tune_len`` (default ``max_seqlen``) picks the autotuner's length bucket; ``window_size`` ``(left, right)``
    (-1: unlimited) restricts each query to a band of keys."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_layout(name, x)
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    o = _empty((T, HQ, D), q)
    lse = _empty((HQ, T), q, torch.float32)
    if T == 0 or B == 0:
        return o, lse
    qk_mul, cap_mul, drop_scale = _scalars(scale, softcap, dropout_p)
    has_window, win_l, win_r = _window_args(window_size, T)

    bucket = _seq_bucket(tune_len or max_seqlen, T)
    sb = ()
    kernel, extra = _attn_fwd_kernel, _pack_arg()
    if not has_window and _use_tma(q, k, v):
        _set_tma_allocator()
        kernel, extra = _attn_fwd_tma_kernel, {}
    else:
        sb, multi = _multi_args(cu_seqlens, T, bucket, has_window, next_power_of_2(D))
        sb = (sb,)
        extra.update(multi)
    kernel[_row_grid(max_seqlen, HQ, HKV, B, T)](
        q, k, v, o, lse, cu_seqlens, order, *sb,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        T, qk_mul, cap_mul, float(dropout_p), drop_scale, kernel_seed(seed), bucket,
        win_l, win_r, G=HQ // HKV, D=D, BD=next_power_of_2(D),
        HAS_SOFTCAP=softcap > 0, HAS_DROPOUT=dropout_p > 0, CAUSAL=bool(causal), HAS_WINDOW=has_window,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", **extra,
    )
    return o, lse


def _row_grid(max_seqlen, HQ, HKV, B, T=None):
    # query-row programs of the forward and dQ: BM rows of one query head, or with PACK BM of a kv head's
    # G·max_seqlen GQA-packed rows; multi-sequence tiles (MULTI): BM rows of the whole pack's T (or T·G) rows
    def grid(meta):
        if meta.get("MULTI"):
            return (cdiv(T * (HQ // HKV), meta["BM"]), HKV, 1) if meta.get("PACK") else (cdiv(T, meta["BM"]), HQ, 1)
        if meta.get("PACK"):
            return (cdiv(max_seqlen * (HQ // HKV), meta["BM"]), HKV, B)
        return (cdiv(max_seqlen, meta["BM"]), HQ, B)

    return grid


def _multi_args(cu_seqlens, T, bucket, has_window, bd):
    """(SB, extra kernel kwargs) of a pointer kernel: the token bounds that multi-sequence tiles read, built where
    those tiles may run (forced, or a sentence-length pack without a window whose head-dim class has such tiles; a
    placeholder otherwise, never read), and under the interpreter the MULTI flag itself (it cannot autotune)."""
    multi = not has_window and (bool(_FORCE_MULTI) if _FORCE_MULTI is not None or INTERPRET
                                else bucket - bucket % 2 == 256 and bool(_MULTI_TILES["fwd"][_head_class(bd)]))
    sb = _seq_bounds(cu_seqlens, T) if multi else cu_seqlens
    return sb, ({"MULTI": multi} if INTERPRET else {})


def _seq_bounds(cu_seqlens, T):
    """int32 ``[2·T]``: every token's sequence start, then its sequence end (absolute token indices), built on the
    device without a host copy; kept with the pack's launch order (_SEQ_CACHE) while that one holds."""
    key = (version_of(cu_seqlens), cu_seqlens.data_ptr(), T)
    ref = _SEQ_CACHE["ref"]
    cached = ref is not None and ref() is cu_seqlens and _SEQ_CACHE["key"][:3] == key \
        and (_SEQ_CACHE["primed"] or not cu_seqlens.is_inference())
    if cached and _SEQ_CACHE.get("sb") is not None:
        return _SEQ_CACHE["sb"]
    cu = cu_seqlens.to(torch.int32)
    lens = cu[1:] - cu[:-1]
    sb = torch.cat([torch.repeat_interleave(cu[:-1], lens, output_size=T),
                    torch.repeat_interleave(cu[1:], lens, output_size=T)])
    if cached:
        _SEQ_CACHE["sb"] = sb
    return sb


def _pack_arg():
    # the interpreter's single config carries no PACK: the launcher passes the forced layout (per-head by default)
    return {"PACK": bool(_FORCE_PACK)} if INTERPRET else {}


def attention_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, order, scale, softcap, dropout_p, seed, causal=False,
                  tune_len=None, window_size=None, dlse=None):
    """Launch the backward kernels. Returns (dq, dk, dv) shaped like q, k, v (dk/dv summed over each GQA group).
    ``dlse`` ([Hq, T], or None): the gradient reaching the log-sum-exp. Since d lse_i / d s_ij = P_ij, it adds
    P_ij · dlse_i to each score's gradient, which is the softmax backward with delta_i - dlse_i for delta_i."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    dq, dk, dv = _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)
    if T == 0 or B == 0:
        return dq, dk, dv
    BD = next_power_of_2(D)
    delta = _empty((HQ, T), q, torch.float32)
    BT = 64 if BD <= 128 else 32
    _attn_bwd_preprocess_kernel[(cdiv(T, BT), HQ)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T, D=D, BD=BD, BT=BT,
    )
    if dlse is not None:
        delta = delta - dlse.float()
    qk_mul, cap_mul, drop_scale = _scalars(scale, softcap, dropout_p)
    has_window, win_l, win_r = _window_args(window_size, T)
    common = dict(G=HQ // HKV, D=D, BD=BD, HAS_SOFTCAP=softcap > 0, HAS_DROPOUT=dropout_p > 0, CAUSAL=bool(causal),
                  HAS_WINDOW=has_window, PREC="ieee" if q.dtype == torch.float32 else "tf32")
    runtime = (T, qk_mul, cap_mul, float(scale), float(dropout_p), drop_scale, kernel_seed(seed),
               _seq_bucket(tune_len or max_seqlen, T), win_l, win_r)

    sb, extra = _multi_args(cu_seqlens, T, runtime[7], has_window, BD)

    def dkdv_grid(meta):
        return (cdiv(T, meta["BN"]), HKV, 1) if meta.get("MULTI") else (cdiv(max_seqlen, meta["BN"]), HKV, B)

    _attn_bwd_dkdv_kernel[dkdv_grid](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, order, sb,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *runtime, **common, **_pack_arg(), **extra,
    )
    _attn_bwd_dq_kernel[_row_grid(max_seqlen, HQ, HKV, B, T)](
        q, k, v, do, lse, delta, dq, cu_seqlens, order, sb,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), *runtime, **common, **_pack_arg(), **extra,
    )
    return dq, dk, dv


def dropout_keep_mask(seed, dropout_p, num_heads, total_tokens, device):
    """The kernels' own dropout keep-mask, materialised: bool [num_heads, T, T] (True = kept).

    Entry ``[h, i, j]`` is the decision for query token ``i`` and key token ``j`` (global packed indices) of query head
    ``h``; only the block-diagonal (same sequence) entries are ever used. For tests and debugging on tiny shapes.
    """
    T = int(total_tokens)
    m = torch.empty((num_heads, T, T), dtype=torch.int8, device=device)
    if T:
        BM = BN = 64
        _dropout_mask_kernel[(cdiv(T, BM), cdiv(T, BN), num_heads)](
            m, T, float(dropout_p), kernel_seed(seed), BM=BM, BN=BN)
    return m.bool()


# one-entry cache: the HF adapter passes the same cu_seqlens tensor to every layer of a forward, so validation (a
# host copy) and the longest-first order run once per batch, not once per layer
_SEQ_CACHE = {"ref": None, "key": None, "info": None, "primed": False, "sb": None}


def _seq_info(cu_seqlens, total_tokens, max_seqlen):
    """(launch order, work-weighted length) of a pack, validated; cached for the tensor until it changes.

    A tensor made under ``torch.inference_mode`` has no version counter, so an in-place change to it cannot be seen:
    its validation is reused only when :func:`prime_seq_info` gave the values, otherwise it is validated again at
    every call (a device-to-host copy each time; priming avoids them). A write that the version counter does not see
    either (through ``.data``, a numpy or DLPack view, another library's kernel) goes unnoticed as well: write a new
    pack's offsets into a new tensor, or prime the edited one again."""
    key = (version_of(cu_seqlens), cu_seqlens.data_ptr(), total_tokens, max_seqlen)
    ref = _SEQ_CACHE["ref"]
    if ref is not None and ref() is cu_seqlens and _SEQ_CACHE["key"] == key \
            and (_SEQ_CACHE["primed"] or not cu_seqlens.is_inference()):
        return _SEQ_CACHE["info"]
    lens_host = _validate_cu_seqlens(cu_seqlens.tolist(), total_tokens, max_seqlen)  # a device-to-host copy
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
    info = (order, _work_length(lens_host))
    _SEQ_CACHE.update(ref=weakref.ref(cu_seqlens), key=key, info=info, primed=False, sb=None)
    return info


def prime_seq_info(cu_seqlens, cu_host, max_seqlen):
    """Tell ``flash_attention`` the host copy ``cu_host`` (a list, numpy array or CPU tensor) of the device tensor
    ``cu_seqlens`` it will be called with next: validation, the launch order and the tuning length then come from
    the host copy, and no attention call on that tensor copies it back (a device synchronisation once per forward,
    which stalls the host's launches behind the device's queue). Raises what ``flash_attention`` raises for bad
    ``cu_seqlens``. A later in-place change to ``cu_seqlens`` drops the primed copy (it is validated again), except
    for a tensor made under ``torch.inference_mode``, which has no version counter: its primed copy holds until
    another tensor is primed or validated, so do not edit it in place meanwhile."""
    cu = [int(x) for x in (cu_host.tolist() if hasattr(cu_host, "tolist") else cu_host)]
    if len(cu) != cu_seqlens.numel():
        raise ValueError(f"cu_host has {len(cu)} entries, cu_seqlens {cu_seqlens.numel()}")
    total = cu[-1] if cu else 0
    lens_host = _validate_cu_seqlens(cu, total, int(max_seqlen))
    order = torch.argsort(torch.tensor(lens_host), descending=True, stable=True).to(torch.int32)
    if cu_seqlens.is_cuda:
        order = order.pin_memory().to(cu_seqlens.device, non_blocking=True)
    else:
        order = order.to(cu_seqlens.device)
    key = (version_of(cu_seqlens), cu_seqlens.data_ptr(), total, int(max_seqlen))
    _SEQ_CACHE.update(ref=weakref.ref(cu_seqlens), key=key, info=(order, _work_length(lens_host)), primed=True,
                      sb=None)


def _work_length(lens):
    # ΣL² / ΣL: the length of the sequence an average unit of attention work belongs to. It sorts packs for the
    # autotuner better than the longest sequence: 125 paragraphs of mean 131 tokens and one of 442 tune as sentences,
    # one 8k document among short ones as a document
    total = sum(lens)
    return -(-sum(n * n for n in lens) // total) if total else 0


# ----------------------------------------------------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o, lse (plus cu_seqlens and the launch order); backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, order, scale, softcap, dropout_p, seed, causal, tune_len=None,
                window_size=None):
        o, lse = attention_fwd(q, k, v, cu_seqlens, max_seqlen, order, scale, softcap, dropout_p, seed, causal,
                               tune_len, window_size)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, order)
        ctx.args = (max_seqlen, scale, softcap, dropout_p, seed, causal, tune_len, window_size)
        ctx.set_materialize_grads(False)  # an unused lse (the usual case) costs nothing in the backward
        return o, lse

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_seqlens, order = ctx.saved_tensors
        max_seqlen, scale, softcap, dropout_p, seed, causal, tune_len, window_size = ctx.args
        if do is None:  # only lse was used
            do = torch.zeros_like(o)
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, order, scale, softcap, dropout_p,
                                   seed, causal, tune_len, window_size, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------------------------------------------------
@on_input_device
def flash_attention(q, k, v, cu_seqlens, max_seqlen, *, scale=None, softcap=0.0, dropout_p=0.0, seed=None,
                    return_lse=False, causal=False, window_size=(-1, -1)):
    """Bidirectional (non-causal) exact softmax attention over packed variable-length sequences.

    Sequences are packed back to back along the token axis; ``cu_seqlens`` marks where each one starts. Every query
    attends to every key *of its own sequence* (no causal mask) and never across a sequence boundary, so no padded
    token is ever computed. ``causal=True`` gives the decoder's own attention on the same packed layout (token ``i`` of
    a sequence sees its tokens ``0..i``), skipping the key blocks above the diagonal: the baseline an LLM2Vec
    conversion is compared with, without a ``[T, T]`` block mask.

    Args:
        q: ``[T, Hq, D]`` queries, ``T`` = total tokens of the pack.
        k, v: ``[T, Hkv, D]`` keys and values (same ``T`` and ``D`` as ``q``).
        cu_seqlens: int32 ``[B + 1]`` cumulative sequence lengths on ``q``'s device: ``cu_seqlens[0] == 0``,
            non-decreasing, ``cu_seqlens[-1] == T``; sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``.
            Empty sequences are allowed. The values are checked on the host once per tensor and cached until the
            tensor's version changes (the layers of one forward share the check): a write that bypasses the version
            counter (``.data``, a numpy view, another kernel) is not seen, so give each pack a new tensor.
        max_seqlen: Python int ≥ the longest sequence (sizes the launch grid, at most ``T`` programs' worth of
            rows: a larger value only launches programs that exit at once). Changing it, or ``T``, never recompiles
            the kernels; the autotuner re-tunes once per length bucket (the pack's work-weighted length
            ΣL²/ΣL ≤ 256, ≤ 1024, longer; packs of at most 8192 tokens apart) and dtype/head-dim/flag combination.
        scale: softmax scale applied to ``q·k``; default ``1 / sqrt(D)``.
        softcap: Gemma-2 style logit soft-capping ``s ← softcap · tanh(s / softcap)`` applied to the scaled scores
            (0 disables it); the backward uses its exact derivative.
        dropout_p: attention dropout probability, applied to the normalised probabilities with inverted scaling
            ``1 / (1 - p)``, as ``torch.nn.functional.scaled_dot_product_attention`` does. ``0`` runs exactly the
            no-dropout kernels. Pass ``0`` at inference: this function does not look at ``module.training``.
        seed: integer seed of the Philox stream that decides which probabilities are dropped. The keep decision of
            score ``(head h, query i, key j)`` is a pure function of ``(seed, h, i, j, T)``, so the backward
            regenerates exactly the forward's mask and the same seed gives the same output. ``None`` draws a seed
            from torch's default (CPU) generator, so ``torch.manual_seed`` makes runs reproducible. Ignored when
            ``dropout_p == 0``. :func:`dropout_keep_mask` materialises the mask for inspection.
        return_lse: also return the log-sum-exp of the (scaled, capped, undropped) scores, ``[Hq, T]`` fp32;
            differentiable too (a loss on it reaches q and k).
        causal: mask keys after the query within each sequence (default False: bidirectional).
        window_size: ``(left, right)`` local attention, FlashAttention's convention: query ``i`` sees key ``j`` of
            its sequence only when ``i - left <= j <= i + right``; ``-1`` leaves a side unlimited (the default
            ``(-1, -1)`` is full attention). A sliding window ``W`` as Hugging Face configs give it is
            ``(W - 1, W - 1)`` bidirectionally (``|i - j| < W``) and ``(W - 1, 0)`` with ``causal``. Only the key
            blocks that meet the band are visited, so work grows with ``L · window`` instead of ``L²``.

    Grouped-query attention: ``Hq`` must be a multiple of ``Hkv``; query head ``i`` reads kv head ``i // (Hq // Hkv)``
    (contiguous groups, as ``repeat_interleave`` in Hugging Face's ``repeat_kv``). ``Hkv == 1`` is multi-query
    attention. Gradients ``dk``/``dv`` are summed over each group.

    Dtypes: fp16, bf16 or fp32, the same for q, k and v; softmax statistics and accumulation are fp32; outputs have the
    input dtype. fp32 inputs use true fp32 products (no TF32) on small tiles without tensor cores: exact, but
    several times slower than bf16/fp16, which are the fast path.

    Head dims: 32, 64, 80, 96, 128, 256 (non-powers of two are padded to the next power of two inside the kernel).
    Layout: the last dimension of q, k, v must be contiguous; the token and head strides are free, so slices of a fused
    QKV projection work without a copy.

    Returns:
        ``o`` ``[T, Hq, D]`` in the input dtype, or ``(o, lse)`` when ``return_lse``. Differentiable in q, k, v.

    Raises:
        TypeError: non-tensor inputs, unsupported or mismatched dtypes, ``cu_seqlens`` not int32, ``max_seqlen`` not an
            int.
        ValueError: wrong ranks or shapes, device mismatch, non-contiguous last dimension, ``Hq % Hkv != 0``,
            unsupported head dim, ``cu_seqlens`` not starting at 0, decreasing, not ending at ``T``, or longer than
            ``max_seqlen``, ``dropout_p`` outside ``[0, 1)``, ``softcap < 0``, ``scale <= 0`` or not finite,
            ``window_size`` not two ints >= -1.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, softcap, dropout_p, window_size, scale, causal, return_lse)
    T, HQ, D = q.shape
    cu_seqlens = cu_seqlens.contiguous()  # the kernels read it as a dense array (a strided view is copied)
    order, tune_len = _seq_info(cu_seqlens, T, int(max_seqlen))
    # no sequence is longer than the pack (validated): a larger max_seqlen would only size the grid with idle programs
    max_seqlen = min(int(max_seqlen), T)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    dropout_p = float(dropout_p)
    check_seed(seed)
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    seed = 0 if seed is None else int(seed)
    window = tuple(int(w) for w in window_size)
    o, lse = FlashAttentionFunction.apply(q, k, v, cu_seqlens, int(max_seqlen), order, scale, float(softcap),
                                          dropout_p, seed, bool(causal), tune_len,
                                          None if window == (-1, -1) else window)
    return (o, lse) if return_lse else o


def _validate(q, k, v, cu_seqlens, max_seqlen, softcap, dropout_p, window_size=(-1, -1), scale=None, causal=False,
              return_lse=False):
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, scale=scale, softcap=softcap, dropout_p=dropout_p,
                         dtypes=SUPPORTED_DTYPES, window_size=window_size, causal=causal, return_lse=return_lse)
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"flash_attention needs CUDA tensors (got {q.device}); use "
                         "llm2vec_fast.kernels.reference.flash_attention_ref on CPU")
    D = q.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_layout(name, x)

