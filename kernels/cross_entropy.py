"""Fused linear + cross-entropy: mean CE of ``hidden @ weight.T + bias`` without materialising all [N, V] logits.

Layers: ``_ce_chunk_kernel`` (per-row online log-sum-exp, loss, and d loss / d logits written over the logits) →
``linear_ce_fwd`` launcher (row chunks, cuBLAS matmuls, gradient accumulation during the forward) →
``FusedLinearCrossEntropyFunction`` → :func:`fused_linear_cross_entropy`.
Twin: :func:`llm2vec_fast.kernels.reference.fused_linear_cross_entropy_ref`.

The gradients are computed during the forward (the loss is a scalar, so backward only scales them by the incoming
gradient): this is what lets a chunk's logits buffer be reused for the next chunk instead of being kept for backward.
"""
import os

import torch
import triton
import triton.language as tl

from ._launch import first_order_only, next_power_of_2, on_input_device
from .reference import _check_ce_args

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Bytes of logits one chunk may hold (in the input dtype). 256 MiB keeps the per-chunk matmul large enough for cuBLAS
# to run near peak (>= 1024 rows at V = 128k in bf16) while being a few percent of the full-logits path's memory.
LOGITS_BUDGET_BYTES = 256 * 2**20
_MIN_CHUNK_ROWS = 64


@triton.jit
def _ce_chunk_kernel(lg, labels, loss, stride_l, V, ignore_index, scale,
                     BV: tl.constexpr, GRAD: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    p_l = lg + i_n * stride_l
    y = tl.load(labels + i_n).to(tl.int64)
    valid = y != ignore_index
    # online log-sum-exp kept per lane (one reduction at the end instead of one per block); the running max starts at
    # a finite -1e30 so that lanes that only ever see masked (-inf) entries give exp(-inf) = 0 rather than NaN
    b_m = tl.full([BV], -1e30, dtype=tl.float32)
    b_d = tl.zeros([BV], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        # [BV] logits upcast to fp32 (the chunk is stored in the input dtype)
        b_x = tl.load(p_l + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        b_mn = tl.maximum(b_m, b_x)
        b_d = b_d * tl.exp(b_m - b_mn) + tl.exp(b_x - b_mn)
        b_m = b_mn
    m = tl.max(b_m, axis=0)
    lse = m + tl.log(tl.sum(b_d * tl.exp(b_m - m), axis=0))
    x_y = tl.load(p_l + y, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss + i_n, tl.where(valid, (lse - x_y) * scale, 0.0))
    if GRAD:
        # d mean-loss / d logits = (softmax - onehot) / n_valid, zero for ignored rows; overwrites the logits in place
        s = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            b_x = tl.load(p_l + o_v, mask=o_v < V, other=0.0).to(tl.float32)
            b_p = tl.exp(b_x - lse)
            b_g = tl.where(o_v == y, b_p - 1.0, b_p) * s
            tl.store(p_l + o_v, b_g.to(lg.dtype.element_ty), mask=o_v < V)


def _pick_chunk_rows(N, V, elem_size):
    rows = max(LOGITS_BUDGET_BYTES // (V * elem_size), _MIN_CHUNK_ROWS)
    rows = rows // _MIN_CHUNK_ROWS * _MIN_CHUNK_ROWS  # multiples of 64 rows keep cuBLAS on its fast tiles
    return max(1, min(rows, N))


def _pick_block_v(V):
    # a GPU program streams its row in 4k blocks (16 values per thread at 8 warps); the interpreter likes big blocks
    return min(next_power_of_2(V), 4096 if not _INTERPRET else 2048)


def linear_ce_fwd(hidden, weight, labels, ignore_index, bias, n_valid, need_gh, need_gw, need_gb,
                  chunk_rows=None, block_v=None):
    """Loss (fp32 scalar) and, when asked, the gradients of the mean loss wrt hidden, weight and bias."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # contiguous gradients whatever the inputs' strides: the per-chunk matmuls write into row slices of them
    gh = torch.empty(N, H, dtype=hidden.dtype, device=dev) if need_gh else None
    gw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if need_gw else None
    gb32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_gb else None
    if n_valid == 0 or N == 0:
        # every row ignored: loss 0 and zero gradients (no matmul at all), as the twin documents
        if gh is not None:
            gh.zero_()
        return (torch.zeros((), dtype=torch.float32, device=dev), gh, gw,
                gb32.to(bias.dtype) if gb32 is not None else None)
    grad = need_gh or need_gw or need_gb
    C = chunk_rows or _pick_chunk_rows(N, V, hidden.element_size())
    BV = block_v or _pick_block_v(V)
    labels = labels.contiguous()
    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    buf = torch.empty(min(C, N), V, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    for s in range(0, N, C):
        e = min(s + C, N)
        h = hidden[s:e]
        lg = buf[: e - s]  # [rows, V]
        if bias is None:
            torch.mm(h, wt, out=lg)
        else:
            torch.addmm(bias, h, wt, out=lg)
        _ce_chunk_kernel[(e - s,)](lg, labels[s:e], loss_rows[s:e], lg.stride(0), V, ignore_index, 1.0 / n_valid,
                                   BV=BV, GRAD=grad, num_warps=8)
        # lg now holds d loss / d logits for these rows
        if need_gh:
            torch.mm(lg, weight, out=gh[s:e])
        if need_gw:
            # accumulated in the weight's dtype: cuBLAS sums each chunk in fp32, one rounding per chunk
            gw.addmm_(lg.t(), h)
        if need_gb:
            gb32 += lg.sum(0, dtype=torch.float32)
    loss = loss_rows.sum()
    if hidden.dtype == torch.float16 and not bool(torch.isfinite(loss)):
        _raise_if_overflow(hidden, weight, bias)
    return loss, gh, gw, gb32.to(bias.dtype) if gb32 is not None else None


def _raise_if_overflow(hidden, weight, bias):
    # fp16 logits are made by the matmul in fp16: one above 65504 becomes inf and the loss NaN. Finite inputs with a
    # non-finite loss can only mean that; say so rather than hand back NaN (non-finite inputs give NaN as they should)
    if all(bool(torch.isfinite(t).all()) for t in (hidden, weight, bias) if t is not None):
        raise ValueError("fused_linear_cross_entropy: float16 logits overflowed (|hidden @ weight.T| above 65504, "
                         "float16's largest value) for finite inputs; use bfloat16 or float32 inputs, or scale them "
                         "down")


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, n_valid, needs, chunk_rows, block_v):
        loss, gh, gw, gb = linear_ce_fwd(hidden, weight, labels, ignore_index, bias, n_valid, *needs,
                                         chunk_rows=chunk_rows, block_v=block_v)
        # the gradients are kept on ctx (not save_for_backward: they are outputs of our own computation, not inputs)
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dloss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward was already run once for this loss (its "
                               "gradients are precomputed in the forward and scaled in place); call the op again")
        gh, gw, gb = ctx.grads
        ctx.grads = None  # scaled in place below and handed to autograd: release our references
        out = []
        for g in (gh, gw, gb):
            out.append(g.mul_(dloss) if g is not None else None)
        return out[0], out[1], out[2], None, None, None, None, None, None


@on_input_device
def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, bias=None,
                               _chunk_rows=None, _block_v=None):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without full [N, V] logits.

    Args:
        hidden: ``[N, H]`` rows to classify (float32, float16 or bfloat16), e.g. the gathered hidden states of the
            masked positions in MNTP.
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[N]`` int64 (int32 accepted) target ids in ``[0, V)``, or ``ignore_index``.
        ignore_index: label value whose rows contribute no loss and no gradient.
        bias: optional ``[V]`` bias, same dtype as ``hidden``.

    Returns:
        A float32 scalar: the mean over the non-ignored rows of ``logsumexp(logits) - logits[label]``. When every row
        is ignored (or N == 0) the loss is 0.0 and all gradients are zero (``F.cross_entropy`` would give NaN).

    How: rows are processed in chunks whose logits fit ``LOGITS_BUDGET_BYTES`` (at least 64 rows). Per chunk, one
    cuBLAS matmul makes the logits in the input dtype; a Triton kernel computes, per row, the log-sum-exp over V in
    blocks with fp32 math, the loss, and overwrites the logits with ``(softmax - onehot) / n_valid``; two more matmuls
    then accumulate ``grad_hidden`` and ``grad_weight`` (and a sum ``grad_bias``) during the forward. Backward only
    multiplies those by the incoming gradient, so it can run once per forward (a second backward raises). When no
    input requires grad (or grad mode is off) no gradient work is done. ``grad_weight`` is accumulated in the weight's
    dtype (fp32 inside each chunk's matmul, one rounding per chunk). Ignored rows still pass through the matmul:
    callers with many ignored rows should gather the valid ones first.

    Raises:
        ValueError / TypeError: wrong ranks, shapes or dtypes, tensors on different devices, or a label outside
            ``[0, V)`` that is not ``ignore_index`` (the message names it); float16 inputs whose logits overflow
            float16 (the logits are made in the input dtype: a loss that is not finite for finite inputs raises
            instead of coming back NaN; that check reads the loss back once per call, float16 only).
    """
    n_valid = _check_ce_args(hidden, weight, labels, ignore_index, bias)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, labels, int(ignore_index), n_valid, needs,
                                                 _chunk_rows, _block_v)
