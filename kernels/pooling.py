"""Masked pooling of packed hidden states (mean, weighted mean, last / first token), with fused L2 normalisation.

Layers: ``_pool_fwd_kernel`` / ``_pool_bwd_kernel`` / ``_l2norm_*_kernel`` → ``pool_fwd`` / ``pool_bwd`` launchers →
``MaskedPoolFunction`` → :func:`masked_pool`. Twin: :func:`llm2vec_fast.kernels.reference.masked_pool_ref`.
"""
import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, next_power_of_2, on_input_device
from .reference import (  # noqa: F401 (prime_pool_args re-exported: priming belongs with the op)
    _check_pool_args,
    check_flag,
    masked_pool_ref,
    prime_pool_args,
)

_MODE_ID = {"mean": 0, "weighted_mean": 1, "last_token": 2, "first_token": 3}
_EPS = 1e-12
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pooled_span(cu, ps, i_b, MODE: tl.constexpr, HAS_PS: tl.constexpr):
    """[lo, hi) pooled tokens of sequence i_b and the factor that turns the weighted sum into the pooled value."""
    bos = tl.load(cu + i_b).to(tl.int64)
    eos = tl.load(cu + i_b + 1).to(tl.int64)
    if MODE == 2:  # last token of the sequence, none when it is empty
        lo = tl.maximum(eos - 1, bos)
        hi = eos
    elif MODE == 3:  # first token of the sequence
        lo = bos
        hi = tl.minimum(bos + 1, eos)
    else:
        if HAS_PS:
            lo = bos + tl.load(ps + i_b).to(tl.int64)
        else:
            lo = bos
        hi = eos
    n = (hi - lo).to(tl.float32)
    if MODE == 1:
        # weights k / (L (L + 1) / 2) for k = 1..L; fp32 holds L (L + 1) exactly up to L ~ 4k, to 1 ulp beyond
        scale = 2.0 / tl.maximum(n * (n + 1.0), 2.0)
    else:
        # the mean over the span; last/first token spans hold at most one token, so it is that token (or zeros)
        scale = 1.0 / tl.maximum(n, 1.0)
    return bos, eos, lo, hi, scale


@triton.jit
def _pool_fwd_kernel(h, cu, ps, o, stride_h, stride_o, D,
                     MODE: tl.constexpr, HAS_PS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    bos, eos, lo, hi, scale = _pooled_span(cu, ps, i_b, MODE, HAS_PS)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    # [BD]
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for t0 in range(lo, hi, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < hi
        # [BT, BD]
        b_h = tl.load(h + o_t[:, None] * stride_h + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        if MODE == 1:
            b_w = (o_t - lo + 1).to(tl.float32)
            b_acc += tl.sum(b_h.to(tl.float32) * b_w[:, None], axis=0)
        else:
            b_acc += tl.sum(b_h.to(tl.float32), axis=0)
    # o is either the output (input dtype) or the fp32 buffer the normalisation reads
    tl.store(o + i_b.to(tl.int64) * stride_o + o_d, b_acc * scale, mask=m_d)


@triton.jit
def _pool_bwd_kernel(dx, cu, ps, dh, stride_dx, stride_dh, D,
                     MODE: tl.constexpr, HAS_PS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    bos, eos, lo, hi, scale = _pooled_span(cu, ps, i_b, MODE, HAS_PS)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    # [BD]
    b_dx = tl.load(dx + i_b.to(tl.int64) * stride_dx + o_d, mask=m_d, other=0.0).to(tl.float32) * scale
    # the whole sequence is written (zeros outside the pooled span), so dh needs no separate memset
    for t0 in range(bos, eos, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < eos
        if MODE == 1:
            b_w = tl.where((o_t >= lo) & (o_t < hi), (o_t - lo + 1).to(tl.float32), 0.0)
        else:
            b_w = tl.where((o_t >= lo) & (o_t < hi), 1.0, 0.0)
        # [BT, BD]
        b_dh = b_w[:, None] * b_dx[None, :]
        tl.store(dh + o_t[:, None] * stride_dh + o_d[None, :], b_dh.to(dh.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _l2norm_fwd_kernel(x, y, stride_x, stride_y, D, EPS: tl.constexpr, BD: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    b_ss = tl.zeros([BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_x = tl.load(x + i_b * stride_x + o_d, mask=o_d < D, other=0.0)
        b_ss += b_x * b_x
    # x / max(||x||, eps): a zero row (empty span) stays zero instead of becoming NaN
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(b_ss, axis=0)), EPS)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_x = tl.load(x + i_b * stride_x + o_d, mask=o_d < D, other=0.0)
        tl.store(y + i_b * stride_y + o_d, (b_x * r).to(y.dtype.element_ty), mask=o_d < D)


@triton.jit
def _l2norm_bwd_kernel(x, dy, dx, stride_x, stride_dy, stride_dx, D, EPS: tl.constexpr, BD: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    b_ss = tl.zeros([BD], dtype=tl.float32)
    b_xdy = tl.zeros([BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_x = tl.load(x + i_b * stride_x + o_d, mask=o_d < D, other=0.0)
        b_dy = tl.load(dy + i_b * stride_dy + o_d, mask=o_d < D, other=0.0).to(tl.float32)
        b_ss += b_x * b_x
        b_xdy += b_x * b_dy
    n = tl.sqrt(tl.sum(b_ss, axis=0))
    xdy = tl.sum(b_xdy, axis=0)
    # d(x / n)/dx = (dy - x (x.dy) / n^2) / n; when n < eps the denominator is the constant eps (clamp has no grad)
    r = 1.0 / tl.maximum(n, EPS)
    c = tl.where(n >= EPS, xdy * r * r * r, 0.0)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_x = tl.load(x + i_b * stride_x + o_d, mask=o_d < D, other=0.0)
        b_dy = tl.load(dy + i_b * stride_dy + o_d, mask=o_d < D, other=0.0).to(tl.float32)
        tl.store(dx + i_b * stride_dx + o_d, b_dy * r - b_x * c, mask=o_d < D)


def _blocks(D):
    BD = min(next_power_of_2(D), 128)
    # the interpreter is fastest with few, large blocks; on a GPU 32 x 128 tiles keep registers low
    BT = 32 if not _INTERPRET else 16
    return BT, BD


def pool_fwd(hidden, cu_seqlens, mode, pool_start, normalize):
    """Launch the pooling (and normalisation) kernels; returns (out [B, D] in hidden.dtype, fp32 pre-norm or None)."""
    T, D = hidden.shape
    B = cu_seqlens.numel() - 1
    BT, BD = _blocks(D)
    ps = pool_start if pool_start is not None else cu_seqlens  # dummy pointer, never read when HAS_PS is False
    out = torch.empty(B, D, dtype=hidden.dtype, device=hidden.device)
    pooled = torch.empty(B, D, dtype=torch.float32, device=hidden.device) if normalize else out
    if B == 0:
        return out, (pooled if normalize else None)
    _pool_fwd_kernel[(B, cdiv(D, BD))](
        hidden, cu_seqlens, ps, pooled, hidden.stride(0), pooled.stride(0), D,
        MODE=_MODE_ID[mode], HAS_PS=pool_start is not None, BT=BT, BD=BD)
    if not normalize:
        return out, None
    _l2norm_fwd_kernel[(B,)](pooled, out, pooled.stride(0), out.stride(0), D, EPS=_EPS,
                             BD=min(next_power_of_2(D), 1024))
    return out, pooled


def pool_bwd(dout, pooled, cu_seqlens, mode, pool_start, T, dtype):
    """Gradient wrt the packed hidden states [T, D] (zero outside the pooled spans)."""
    B, D = dout.shape
    BT, BD = _blocks(D)
    dout = dout.contiguous()
    dh = torch.empty(T, D, dtype=dtype, device=dout.device)
    if B == 0 or T == 0:
        return dh.zero_()
    if pooled is not None:  # back through x / max(||x||, eps) first, in fp32
        dx = torch.empty(B, D, dtype=torch.float32, device=dout.device)
        _l2norm_bwd_kernel[(B,)](pooled, dout, dx, pooled.stride(0), dout.stride(0), dx.stride(0), D, EPS=_EPS,
                                 BD=min(next_power_of_2(D), 1024))
    else:
        dx = dout
    ps = pool_start if pool_start is not None else cu_seqlens
    _pool_bwd_kernel[(B, cdiv(D, BD))](
        dx, cu_seqlens, ps, dh, dx.stride(0), dh.stride(0), D,
        MODE=_MODE_ID[mode], HAS_PS=pool_start is not None, BT=BT, BD=BD)
    return dh


class MaskedPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, cu_seqlens, pool_start, mode, normalize):
        out, pooled = pool_fwd(hidden, cu_seqlens, mode, pool_start, normalize)
        # hidden itself is not needed for the gradient: only the spans and (when normalised) the fp32 pooled rows
        ctx.save_for_backward(cu_seqlens, pool_start, pooled)
        ctx.mode, ctx.T, ctx.dtype = mode, hidden.shape[0], hidden.dtype
        return out

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dout):
        cu_seqlens, pool_start, pooled = ctx.saved_tensors
        dh = pool_bwd(dout, pooled, cu_seqlens, ctx.mode, pool_start, ctx.T, ctx.dtype)
        return dh, None, None, None, None


@on_input_device
def masked_pool(hidden, cu_seqlens, mode="mean", pool_start=None, normalize=False):
    """Pool packed hidden states into one vector per sequence (Triton, forward and backward).

    Args:
        hidden: ``[total_tokens, D]`` packed hidden states of B sequences laid end to end (float32, float16 or
            bfloat16; the feature dim must be contiguous, rows may be strided).
        cu_seqlens: int32 ``[B + 1]`` cumulative sequence lengths, starting at 0, non-decreasing, ending at
            ``total_tokens``; sequence i is ``hidden[cu_seqlens[i]:cu_seqlens[i + 1]]``.
        mode: ``"mean"``, ``"weighted_mean"``, ``"last_token"`` (alias ``"eos_token"``) or ``"first_token"`` (alias
            ``"bos_token"``).
        pool_start: optional int32 ``[B]``: offset, relative to the start of sequence i, of its first pooled token.
            The tokens before it (an instruction) were attended to but are not pooled. ``None`` pools whole sequences.
            Must satisfy ``0 <= pool_start[i] <= length_i``.
        normalize: fuse an L2 normalisation ``x / max(||x||, 1e-12)`` of each pooled vector.

    Semantics (those of the original llm2vec 0.2.3 on the pooled span ``[start_i + pool_start_i, end_i)`` of
    length L):

    - ``mean``: the mean of the span's tokens.
    - ``weighted_mean``: token k (1-based) of the span gets weight ``k / (L (L + 1) / 2)``, so later tokens count
      more (the original's weights 1..L divided by their sum).
    - ``last_token`` / ``eos_token``: the last token of the sequence (``end_i - 1``); ``pool_start`` is ignored.
    - ``first_token`` / ``bos_token``: the first token of the sequence (``start_i``, where the BOS token sits);
      ``pool_start`` is ignored.

    An empty pooled span gives a **zero vector** (never NaN), also with ``normalize=True`` (zero stays zero), and
    passes no gradient: for ``mean`` / ``weighted_mean`` when ``pool_start_i == length_i``, in every mode for a
    zero-length sequence (the token modes ignore ``pool_start``, so a sequence with tokens always has its token).
    (The original would pool the whole padded row in that case, an artefact of ``x[-0:]``; we do not reproduce it.)

    Accumulation is in fp32; the result is ``[B, D]`` in ``hidden.dtype``. Gradients flow to ``hidden`` only (zero
    outside the pooled spans); ``cu_seqlens`` and ``pool_start`` get none.

    Raises:
        ValueError / TypeError: unknown mode, ``hidden`` not 2-D or not a float type, ``cu_seqlens`` not int32 or not
            a valid prefix sum of ``total_tokens``, ``pool_start`` of the wrong shape / dtype / out of range, tensors
            on different devices.
    """
    mode = _check_pool_args(hidden, cu_seqlens, mode, pool_start)
    check_flag("normalize", normalize)
    if hidden.shape[1] == 0:  # no features: the twin's [B, 0] result, still in hidden's graph
        return masked_pool_ref(hidden, cu_seqlens, mode, pool_start, normalize)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return MaskedPoolFunction.apply(hidden, cu_seqlens.contiguous(),
                                    pool_start.contiguous() if pool_start is not None else None, mode, bool(normalize))
