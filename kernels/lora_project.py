"""Dropout fused into a skinny projection: ``dropout(x) @ weight.T`` for a LoRA down-projection ``weight [r, K]``,
forward and backward, with the keep mask drawn in the kernels from a Philox seed and never written to memory.

What it replaces, per adapted layer and per input element, on a GPU: torch's dropout reads ``x`` and writes the
dropped-out copy and a bool mask, the product reads the copy back (7 bytes moved for bf16, where the product alone
reads 2); in the backward the mask is applied again to the input gradient (3 more passes) and the copy is needed
again for the weight gradient. Here the forward reads ``x`` once; the backward reads ``x`` once for d weight and
writes d x once, both regenerating the same keep bits. A LoRA layer's rank-r products are memory-bound, so bytes
moved are its time.

Layers: ``_dp_fwd_kernel`` / ``_dp_dw_kernel`` / ``_dp_dx_kernel`` → ``dropout_project_fwd`` /
``dropout_project_bwd`` launchers (used directly by :mod:`llm2vec_fast.lora`'s fused LoRA) →
``DropoutProjectFunction`` → :func:`dropout_project`. Twin: :func:`llm2vec_fast.kernels.reference.dropout_project_ref`
(with the kernels' own mask from :func:`keep_mask`).

Keep rule: element ``(i, k)`` of ``x [N, K]`` is kept when its uniform is ``>= p``; the uniforms of columns
``4c .. 4c + 3`` of row ``i`` are the four outputs of one Philox call, ``tl.rand4x(seed, i · cdiv(K, 4) + c)`` (int64
counters), so a decision depends only on ``(seed, i, k, K)``. Kept values are scaled by ``1 / (1 − p)`` and rounded
to the weight's dtype before the product (as ``dropout`` then ``matmul`` round in that dtype); products accumulate
in fp32. K and R are compile-time (model dims: a decoder layer compiles two K's, the hidden and the MLP width); the
row count never recompiles.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, kernel_seed, new_seed, next_power_of_2, num_sms, on_input_device
from .reference import DROPOUT_PROJECT_MAX_RANK as MAX_RANK
from .reference import _check_dropout_project_args, check_seed

_BN, _BK = 64, 64


@triton.jit
def _uniform(seed, o_n, k0, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # [BN, BK] uniforms for columns k0 .. k0 + BK of rows o_n: one Philox call (tl.rand4x) per 4 consecutive columns,
    # its counter row · cdiv(K, 4) + column // 4; a call per element would make the kernels compute-bound on the
    # random numbers (about 60 integer operations each) instead of memory-bound on x
    o_c = k0 // 4 + tl.arange(0, BK // 4)
    b_r0, b_r1, b_r2, b_r3 = tl.rand4x(seed, o_n[:, None] * ((K + 3) // 4) + o_c[None, :])
    return tl.reshape(tl.join(tl.join(b_r0, b_r1), tl.join(b_r2, b_r3)), (BN, BK))


@triton.jit
def _keep(b_x, o_n, k0, p, scale, seed, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          HAS_DROPOUT: tl.constexpr):
    # [BN, BK] the kept values scaled by 1 / (1 - p) in fp32, the dropped ones 0
    if HAS_DROPOUT:
        b_x = tl.where(_uniform(seed, o_n, k0, K, BN, BK) >= p, b_x * scale, 0.0)
    return b_x


@triton.jit(do_not_specialize=["N", "seed"])
def _dp_fwd_kernel(x, w, y, stride_x, stride_w, stride_y, N, p, scale, seed, K: tl.constexpr, R: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_r = tl.arange(0, BR)
    m_n = o_n < N
    m_r = o_r < R
    # [BN, BR]
    b_acc = tl.zeros([BN, BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        # [BN, BK] x rounded to the weight's dtype first (x.to(dtype) before the dropout, as the torch path)
        b_x = tl.load(x + o_n[:, None] * stride_x + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = _keep(b_x.to(w.dtype.element_ty).to(tl.float32), o_n, k0, p, scale, seed, K, BN, BK, HAS_DROPOUT)
        # [BK, BR] the weight transposed
        b_w = tl.load(w + o_r[None, :] * stride_w + o_k[:, None], mask=m_k[:, None] & m_r[None, :], other=0.0)
        b_acc += tl.dot(b_x.to(w.dtype.element_ty), b_w, input_precision=PREC)
    tl.store(y + o_n[:, None] * stride_y + o_r[None, :], b_acc.to(y.dtype.element_ty),
             mask=m_n[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["N", "seed", "rows_per_prog"])
def _dp_dw_kernel(x, dy, dw, stride_x, stride_dy, N, rows_per_prog, p, scale, seed, K: tl.constexpr,
                  R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  PREC: tl.constexpr):
    # d weight [R, K] = dy.T @ dropout(x): program (i_k, i_p) sums rows [lo, hi) of its BK columns into its own
    # fp32 partial; the launcher sums the partials (no atomics: bit-identical from run to run)
    i_k, i_p = tl.program_id(0), tl.program_id(1)
    o_k = i_k * BK + tl.arange(0, BK)
    o_r = tl.arange(0, BR)
    m_k = o_k < K
    m_r = o_r < R
    lo = i_p.to(tl.int64) * rows_per_prog
    hi = tl.minimum(lo + rows_per_prog, N)
    # [BR, BK]
    b_acc = tl.zeros([BR, BK], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < hi
        # [BN, BK]
        b_x = tl.load(x + o_n[:, None] * stride_x + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = _keep(b_x.to(dy.dtype.element_ty).to(tl.float32), o_n, i_k * BK, p, scale, seed, K, BN, BK, HAS_DROPOUT)
        # [BR, BN] dy transposed
        b_dy = tl.load(dy + o_n[None, :] * stride_dy + o_r[:, None], mask=m_r[:, None] & m_n[None, :], other=0.0)
        b_acc += tl.dot(b_dy, b_x.to(dy.dtype.element_ty), input_precision=PREC)
    tl.store(dw + (i_p.to(tl.int64) * BR + o_r[:, None]) * K + o_k[None, :], b_acc, mask=m_r[:, None] & m_k[None, :])


@triton.jit(do_not_specialize=["N", "seed"])
def _dp_dx_kernel(dy, w, dx, stride_dy, stride_w, stride_dx, N, p, scale, seed, K: tl.constexpr, R: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr):
    # d x [N, K] = (dy @ weight) * keep / (1 - p), one rounding
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_r = tl.arange(0, BR)
    m_n = o_n < N
    m_k = o_k < K
    m_r = o_r < R
    # [BN, BR], [BR, BK]
    b_dy = tl.load(dy + o_n[:, None] * stride_dy + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)
    b_w = tl.load(w + o_r[:, None] * stride_w + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
    # [BN, BK]
    b_dx = _keep(tl.dot(b_dy, b_w, input_precision=PREC), o_n, i_k * BK, p, scale, seed, K, BN, BK, HAS_DROPOUT)
    tl.store(dx + o_n[:, None] * stride_dx + o_k[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_n[:, None] & m_k[None, :])


@triton.jit(do_not_specialize=["N", "seed"])
def _keep_mask_kernel(m, N, p, seed, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_k = i_k * BK + tl.arange(0, BK)
    b_keep = _uniform(seed, o_n, i_k * BK, K, BN, BK) >= p
    tl.store(m + o_n[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=(o_n < N)[:, None] & (o_k < K)[None, :])


def _rank_block(R):
    if R > MAX_RANK:
        raise ValueError(f"dropout_project supports a weight of up to {MAX_RANK} rows (a LoRA rank), got {R}")
    return max(16, next_power_of_2(R))  # tl.dot needs every dimension >= 16


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact products, as torch's fp32 matmul by default


def _rows(t):
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def dropout_project_fwd(x, weight, dropout_p, seed):
    """``dropout(x.to(w.dtype)) @ weight.T`` for x ``[..., K]`` (any float dtype) and weight ``[R, K]``: ``[N, R]`` in
    the weight's dtype (N = the product of x's leading dims)."""
    x2 = _rows(x)
    N, K = x2.shape
    R = weight.shape[0]
    BR = _rank_block(R)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((N, R), dtype=weight.dtype, device=x.device)
    if N:
        _dp_fwd_kernel[(cdiv(N, _BN),)](
            x2, weight, y, x2.stride(0), weight.stride(0), y.stride(0), N, float(dropout_p),
            1.0 / (1.0 - dropout_p), kernel_seed(seed), K=K, R=R, BN=_BN, BK=_BK, BR=BR, HAS_DROPOUT=dropout_p > 0,
            PREC=_prec(weight.dtype))
    return y


def dropout_project_bwd(dy, x, weight, dropout_p, seed, need_x=True, need_weight=True):
    """Gradients of :func:`dropout_project_fwd` for the upstream ``dy [N, R]`` (the weight's dtype): ``(dx [N, K]
    in the weight's dtype or None, d weight [R, K] fp32 or None)``; the keep mask is regenerated from ``seed``."""
    x2 = _rows(x)
    N, K = x2.shape
    R = weight.shape[0]
    BR = _rank_block(R)
    dy = dy.to(weight.dtype)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    args = (float(dropout_p), 1.0 / (1.0 - dropout_p), kernel_seed(seed))
    flags = dict(K=K, R=R, BN=_BN, BK=_BK, BR=BR, HAS_DROPOUT=dropout_p > 0, PREC=_prec(weight.dtype))
    dx = dw = None
    if need_x:
        dx = torch.empty((N, K), dtype=weight.dtype, device=x.device)
        if N:
            _dp_dx_kernel[(cdiv(N, _BN), cdiv(K, _BK))](
                dy, weight, dx, dy.stride(0), weight.stride(0), dx.stride(0), N, *args, **flags)
    if need_weight:
        col_blocks = cdiv(K, _BK)
        if x.is_cuda:  # about two programs per SM over the column blocks and row ranges
            target = 2 * num_sms(x.device)
            parts = max(1, min(cdiv(N, _BN), cdiv(target, col_blocks)))
        else:  # the interpreter runs programs one by one: a few partials still exercise the sum
            parts = max(1, min(cdiv(N, _BN), 3))
        rows_per_prog = cdiv(cdiv(max(N, 1), parts), _BN) * _BN
        parts = cdiv(max(N, 1), rows_per_prog)
        partial = torch.empty((parts, BR, K), dtype=torch.float32, device=x.device)
        _dp_dw_kernel[(col_blocks, parts)](
            x2, dy, partial, x2.stride(0), dy.stride(0), N, rows_per_prog, *args, **flags)
        dw = partial[:, :R].sum(0)
    return dx, dw


def keep_mask(seed, dropout_p, rows, cols, device):
    """The kernels' keep mask for an ``[rows, cols]`` input, materialised as bool (True = kept): for tests."""
    m = torch.empty((rows, cols), dtype=torch.int8, device=device)
    if rows and cols:
        _keep_mask_kernel[(cdiv(rows, _BN), cdiv(cols, _BK))](
            m, rows, float(dropout_p), kernel_seed(seed), K=cols, BN=_BN, BK=_BK)
    return m.bool()


class DropoutProjectFunction(torch.autograd.Function):
    """Saves x and the seed; the backward regenerates the keep mask."""

    @staticmethod
    def forward(ctx, x, weight, dropout_p, seed):
        y = dropout_project_fwd(x, weight, dropout_p, seed)
        ctx.save_for_backward(x, weight)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx, dw = dropout_project_bwd(dy.reshape(-1, dy.shape[-1]), x, weight, ctx.dropout_p, ctx.seed, need_x, need_w)
        if dx is not None:
            dx = dx.to(x.dtype).view(x.shape)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dx, dw, None, None


@on_input_device
def dropout_project(x, weight, dropout_p=0.0, seed=None):
    """``dropout(x, dropout_p) @ weight.T`` in one pass over ``x``, differentiable in both: a LoRA layer's down
    projection with its input dropout.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16 (last dimension contiguous, or it is copied).
        weight: ``[R, K]`` with ``R <= 128`` (a LoRA rank), same device; the product runs in its dtype (x is
            rounded to it first, as ``x.to(weight.dtype)``), accumulating in fp32.
        dropout_p: probability of zeroing an element of ``x``, in ``[0, 1)``; kept elements are scaled by
            ``1 / (1 - dropout_p)``.
        seed: the Philox seed of the keep mask (int); None draws one from torch's CPU generator (so
            ``torch.manual_seed`` and checkpointing's RNG replay give the same mask). The same seed gives the same
            mask, forward and backward (element ``(i, k)`` of x's rows: see the module's keep rule).

    Returns ``[..., R]`` in the weight's dtype. Raises ``ValueError`` / ``TypeError`` for mismatched shapes,
    dtypes, devices, a rank above 128 or a probability outside ``[0, 1)``.
    """
    _check_dropout_project_args(x, weight, dropout_p)
    check_seed(seed)
    if x.shape[-1] == 0 or weight.shape[0] == 0:
        # nothing to project or no output column: zeros or an empty result, still in the graph of both inputs (as the
        # twin's x @ w.T), with zero or empty gradients
        return x.to(weight.dtype) @ weight.t()
    if seed is None:
        seed = new_seed()
    return DropoutProjectFunction.apply(x, weight, float(dropout_p), int(seed))
