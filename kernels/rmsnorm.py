"""RMS normalisation with a learned scale, exactly Hugging Face's ``LlamaRMSNorm`` (Llama, Mistral, Qwen2, Qwen3) and,
with ``unit_offset=True``, ``GemmaRMSNorm`` (Gemma 1-3: the scale is ``1 + weight``, applied in fp32).

Layers: ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel`` → ``rms_norm_fwd`` / ``rms_norm_bwd`` launchers →
``RMSNormFunction`` → :func:`rms_norm`. Twin: :func:`llm2vec_fast.kernels.reference.rms_norm_ref`.

The forward saves x, the weight and one fp32 ``rstd`` per row. The backward runs a fixed number of programs, each
over a contiguous block of rows, each writing its fp32 partial sum of d weight to its own row of a small buffer that
is then summed (Liger's scheme): no atomics, so d weight is bit-identical from run to run.
"""
import math
import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, next_power_of_2, num_sms, on_input_device
from .reference import _check_rms_norm_args, check_flag

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_D = 65536  # one program holds a whole row: beyond this it would not fit in registers (or shared memory)
_TILE = 4096  # elements per [BR, BD] tile: several short rows per program, one row when D >= 4096


@triton.jit(do_not_specialize=["N"])
def _rms_norm_fwd_kernel(x, w, y, rstd, stride_x, stride_y, N, D, eps, BR: tl.constexpr, BD: tl.constexpr,
                         UNIT_OFFSET: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < N
    m_d = o_d < D
    m = m_r[:, None] & m_d[None, :]
    # [BR, BD]
    b_x = tl.load(x + o_r[:, None] * stride_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    # [BR] masked lanes are zeros, so the sum is over the D real features
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_xh = b_x * b_rstd[:, None]
    if UNIT_OFFSET:
        # Gemma: the scale is 1 + weight, all in fp32, one rounding at the end
        b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32) + 1.0
    else:
        # Llama: HF rounds the normalised value to x's dtype before the weight multiplies it, then the product
        b_xh = b_xh.to(x.dtype.element_ty).to(tl.float32)
        b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(y + o_r[:, None] * stride_y + o_d[None, :], (b_xh * b_w[None, :]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_rstd, mask=m_r)


@triton.jit(do_not_specialize=["N", "rows_per_prog"])
def _rms_norm_bwd_kernel(x, w, rstd, dy, dx, dw, stride_x, stride_dy, stride_dx, N, D, rows_per_prog,
                         BR: tl.constexpr, BD: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
                         UNIT_OFFSET: tl.constexpr):
    i_p = tl.program_id(0)
    lo = i_p.to(tl.int64) * rows_per_prog
    hi = tl.minimum(lo + rows_per_prog, N)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BD]
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        b_w += 1.0
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        o_r = r0 + tl.arange(0, BR)
        m_r = o_r < hi
        m = m_r[:, None] & m_d[None, :]
        # [BR, BD]
        b_x = tl.load(x + o_r[:, None] * stride_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_r[:, None] * stride_dy + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        # [BR]
        b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.0)
        b_xh = b_x * b_rstd[:, None]
        if HAS_DW:
            # d weight sees the normalised value as the forward used it: rounded to x's dtype (Llama) or not (Gemma)
            if UNIT_OFFSET:
                b_dw += tl.sum(b_dy * b_xh, axis=0)
            else:
                b_dw += tl.sum(b_dy * b_xh.to(x.dtype.element_ty).to(tl.float32), axis=0)
        if HAS_DX:
            # the rounding has no gradient (as in torch's autograd of .to): dx = rstd (g - x_hat mean(g x_hat))
            b_g = b_dy * b_w[None, :]
            b_c = tl.sum(b_g * b_xh, axis=1) / D
            b_dx = b_rstd[:, None] * (b_g - b_xh * b_c[:, None])
            tl.store(dx + o_r[:, None] * stride_dx + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
    if HAS_DW:
        # a program with no rows still writes its (zero) partial: the buffer is never memset
        tl.store(dw + i_p.to(tl.int64) * D + o_d, b_dw, mask=m_d)


def _blocks(D):
    """(BR, BD, num_warps): the whole row in one block of BD >= D lanes, BR rows per tile."""
    if D > MAX_D:
        raise ValueError(f"rms_norm supports a feature size D up to {MAX_D} (a whole row per program), got D={D}")
    BD = next_power_of_2(max(D, 1))
    BR = max(1, min(_TILE // BD, 64))
    # about 16 fp32 values per thread and block: 4 warps for short tiles, 32 for a 64k row
    num_warps = min(max(BR * BD // 512, 4), 32)
    return BR, BD, num_warps


def _bwd_programs(device, tiles):
    # two programs per SM hide some memory latency; more would grow the [P, D] fp32 partial-d-weight buffer that is
    # written and read back (at 4096 x 2048 bf16 it is 2 MiB against 48 MiB of x, dy and dx). The interpreter runs
    # programs one by one, so there a handful suffices (and still exercises several partials).
    if device.type == "cuda" and not _INTERPRET:
        return min(tiles, 2 * num_sms(device))
    return min(tiles, 4)


def rms_norm_fwd(x, weight, eps, unit_offset=False):
    """Launch the forward on x ``[..., D]`` (last dim contiguous): (y in x's shape, rstd fp32 [N], x as [N, D])."""
    D = x.shape[-1]
    N = math.prod(x.shape[:-1])
    x2 = x.reshape(N, D)  # a view whenever the leading dims merge (rows may be strided)
    out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if x2.numel() == 0:
        return y, rstd, x2
    BR, BD, num_warps = _blocks(D)
    y2 = y.view(-1, D)
    _rms_norm_fwd_kernel[(cdiv(N, BR),)](x2, weight, y2, rstd, x2.stride(0), y2.stride(0), N, D, eps,
                                                BR=BR, BD=BD, UNIT_OFFSET=unit_offset, num_warps=num_warps)
    return y, rstd, x2


def rms_norm_bwd(dy, x2, weight, rstd, x_shape, need_dx, need_dw, unit_offset=False):
    """Gradients (dx in x's dtype and shape, dweight in weight's dtype) or None where not needed."""
    N, D = x2.shape
    dev = x2.device
    dx = torch.empty(x_shape, dtype=x2.dtype, device=dev) if need_dx else None
    if x2.numel() == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    BR, BD, num_warps = _blocks(D)
    dy2 = dy.reshape(N, D)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    tiles = cdiv(N, BR)
    P = _bwd_programs(dev, tiles)
    rows_per_prog = cdiv(tiles, P) * BR
    P = cdiv(N, rows_per_prog)  # no program without rows
    dx2 = dx.view(-1, D) if need_dx else x2  # dummy pointer when HAS_DX is False, never written
    dw_part = torch.empty(P, D, dtype=torch.float32, device=dev) if need_dw else rstd  # likewise
    _rms_norm_bwd_kernel[(P,)](x2, weight, rstd, dy2, dx2, dw_part, x2.stride(0), dy2.stride(0), dx2.stride(0),
                               N, D, rows_per_prog, BR=BR, BD=BD, HAS_DX=need_dx, HAS_DW=need_dw,
                               UNIT_OFFSET=unit_offset, num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        y, rstd, x2 = rms_norm_fwd(x, weight, eps, unit_offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.unit_offset = x.shape, unit_offset
        return y

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x2, weight, rstd, ctx.x_shape, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                              ctx.unit_offset)
        return dx, dw, None, None


@on_input_device
def rms_norm(x, weight, eps=1e-6, *, unit_offset=False):
    """RMS-normalise the last dim of ``x`` and scale it by ``weight`` (Triton, forward and backward).

    Drop-in for Hugging Face's ``LlamaRMSNorm.forward`` (also ``MistralRMSNorm``, ``Qwen2RMSNorm``,
    ``Qwen3RMSNorm``: the same code), i.e.::

        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    With ``unit_offset=True``: Hugging Face's ``GemmaRMSNorm`` (Gemma, Gemma 2, Gemma 3), whose stored weight is
    the scale minus one::

        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (h * (1.0 + weight.float())).type_as(x)

    Args:
        x: ``[..., D]`` (any number of leading dims, D any size from 1 to 65536), float32, float16 or bfloat16. The
            last dim should be contiguous (rows may be strided, e.g. a slice of a wider buffer); otherwise a
            contiguous copy is made.
        weight: ``[D]`` scale, float32, float16 or bfloat16 (it need not match ``x``).
        eps: added to the mean square before the reciprocal square root; a positive finite number (HF's default
            is 1e-6; models pass ``config.rms_norm_eps``).
        unit_offset: Gemma's convention (scale ``1 + weight``, fp32 throughout, output in x's dtype).

    Returns:
        ``[..., D]`` in ``torch.promote_types(weight.dtype, x.dtype)`` (bf16 weight and bf16 x give bf16, fp32
        weight and bf16 x give fp32; with ``unit_offset``, x's dtype), contiguous.

    Rounding, as HF's: the mean square, ``rstd`` and ``x * rstd`` are fp32; ``x * rstd`` is rounded to x's dtype;
    that is multiplied by the weight in fp32 and rounded once to the output dtype (exactly what torch does for
    ``weight * h`` with both in bf16). With ``unit_offset`` nothing is rounded before the final store.

    Gradients flow to ``x`` (in x's dtype) and ``weight`` (in weight's dtype) in fp32 math. With
    ``x_hat = x * rstd`` and ``g = dy * weight``: ``dx = rstd * (g - x_hat * mean(g * x_hat))``, and
    ``dweight = sum over rows of dy * x_hat`` with ``x_hat`` rounded as in the forward, accumulated in
    fp32 per block of rows, the blocks' sums added in a fixed order (deterministic, no atomics) and rounded once. A
    weight that does not require grad costs no d-weight work. An input with no rows gives an empty output (and a
    zero d weight).

    Raises:
        TypeError: ``x`` or ``weight`` not a float16 / bfloat16 / float32 tensor, or ``eps`` not a real number.
        ValueError: ``weight`` not of shape ``(D,)`` (the message names both shapes), tensors on different
            devices, ``eps`` not positive and finite, ``x`` 0-dimensional or D above 65536.
    """
    _check_rms_norm_args(x, weight, eps)
    check_flag("unit_offset", unit_offset)
    _blocks(x.shape[-1])  # the launcher's limit on D, raised before any copy or graph node is made
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return RMSNormFunction.apply(x, weight, float(eps), bool(unit_offset))
