"""Rotary position embedding of packed queries and keys in one kernel, forward and backward: Hugging Face's Llama-family
``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2, Qwen3, Gemma) on the token-major ``[T, H, D]`` layout.

Layers: ``_rope_kernel`` (``BWD`` picks the map or its transpose; ``_rope_heads`` rotates one tensor's heads) →
``rope_fwd`` / ``rope_bwd`` launchers → ``RoPEFunction`` → :func:`rope`. Twin:
:func:`llm2vec_fast.kernels.reference.rope_ref`.

One program per block of BT tokens does every head of q and of k: its cos / sin rows are loaded once and reused for
all ``Hq + Hkv`` heads, BH heads at a time in ``[BT, BH, BD]`` tiles of half-width ``BD = next_power_of_2(D / 2)``
(masked, so any even D). Inputs are read through their token and head strides (a view of a fused qkv projection is
not copied); offsets are int64. The forward saves cos and sin only: the map is linear, its backward needs no q or k.
"""
import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, next_power_of_2, on_input_device
from .reference import _check_rope_args, rope_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# half-width elements per [BT, BH, BD] tile: on the GPU one token's 32 heads of D = 128 (or several tokens of fewer
# heads); the interpreter runs programs one by one, so there fewer, larger tiles
_TILE = 8192 if _INTERPRET else 2048
MAX_D = 4096  # a tile holds at least one whole head: BD = D / 2 <= 2048 <= _TILE
_NUM_WARPS = 4


@triton.jit
def _rope_heads(x, y, b_c1, b_c2, b_s1, b_s2, o_t, m_t, stride_t, stride_h, H: tl.constexpr, D: tl.constexpr,
                BH: tl.constexpr, BD: tl.constexpr, BWD: tl.constexpr):
    """Rotate the H heads of one token block of x (strided) into y (contiguous [T, H, D]), BH heads at a time."""
    D2 = D // 2
    o_d = tl.arange(0, BD)
    m_d = o_d < D2
    for h0 in range(0, H, BH):
        # int64: a transposed [H, T, D] view has a head stride of T * D
        o_h = (h0 + tl.arange(0, BH)).to(tl.int64)
        m = m_t[:, None, None] & (o_h < H)[None, :, None] & m_d[None, None, :]
        # [BT, BH, BD] the two halves of each head
        p_x = x + o_t[:, None, None] * stride_t + o_h[None, :, None] * stride_h + o_d[None, None, :]
        b_x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + D2, mask=m, other=0.0).to(tl.float32)
        # per pair (x1, x2) the forward is [[c1, -s1], [s2, c2]]; the backward is its transpose. c1 and c2 (s1, s2)
        # are kept apart: equal for HF's cat(freqs, freqs), but the op is exact for any cos / sin
        if BWD:
            b_y1 = b_x1 * b_c1 + b_x2 * b_s2
            b_y2 = b_x2 * b_c2 - b_x1 * b_s1
        else:
            b_y1 = b_x1 * b_c1 - b_x2 * b_s1
            b_y2 = b_x2 * b_c2 + b_x1 * b_s2
        p_y = y + (o_t[:, None, None] * H + o_h[None, :, None]) * D + o_d[None, None, :]
        tl.store(p_y, b_y1.to(y.dtype.element_ty), mask=m)
        tl.store(p_y + D2, b_y2.to(y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def _rope_kernel(q, k, cos, sin, q_out, k_out, stride_qt, stride_qh, stride_kt, stride_kh, stride_c, stride_s, T,
                 HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                 BHQ: tl.constexpr, BHK: tl.constexpr, BWD: tl.constexpr):
    # D and the head counts are model dims, compiled in: the second half's offset D / 2 is then known, and so is its
    # alignment, and the head loops have constant trip counts (a runtime bound also trips triton 3.6's interpreter)
    i_t = tl.program_id(0)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = o_t < T
    D2 = D // 2
    o_d = tl.arange(0, BD)
    m = m_t[:, None] & (o_d < D2)[None, :]
    # [BT, BD] the halves of this block's cos / sin rows, fp32 whatever their dtype, shared by every head
    p_c = cos + o_t[:, None] * stride_c + o_d[None, :]
    p_s = sin + o_t[:, None] * stride_s + o_d[None, :]
    b_c1 = tl.load(p_c, mask=m, other=0.0).to(tl.float32)
    b_c2 = tl.load(p_c + D2, mask=m, other=0.0).to(tl.float32)
    b_s1 = tl.load(p_s, mask=m, other=0.0).to(tl.float32)
    b_s2 = tl.load(p_s + D2, mask=m, other=0.0).to(tl.float32)
    # [BT, 1, BD]
    b_c1, b_c2, b_s1, b_s2 = b_c1[:, None, :], b_c2[:, None, :], b_s1[:, None, :], b_s2[:, None, :]
    _rope_heads(q, q_out, b_c1, b_c2, b_s1, b_s2, o_t, m_t, stride_qt, stride_qh, HQ, D, BHQ, BD, BWD)
    _rope_heads(k, k_out, b_c1, b_c2, b_s1, b_s2, o_t, m_t, stride_kt, stride_kh, HKV, D, BHK, BD, BWD)


def _blocks(D, HQ, HKV):
    """(BT, BD, BHQ, BHK): half-width BD >= D / 2, up to a tile's worth of heads, then as many tokens as fit."""
    if D > MAX_D:
        raise ValueError(f"rope supports a head dim D up to {MAX_D}, got D={D}")
    BD = next_power_of_2(max(D // 2, 1))
    BHQ, BHK = (min(next_power_of_2(max(h, 1)), max(1, _TILE // BD)) for h in (HQ, HKV))
    BT = max(1, min(_TILE // (max(BHQ, BHK) * BD), 64))
    return BT, BD, BHQ, BHK


def _launch(q, k, cos, sin, bwd):
    """Run the kernel on q ``[T, Hq, D]`` / k ``[T, Hkv, D]`` (last dim contiguous, or None: that tensor is skipped);
    returns new contiguous outputs (None where the input was None)."""
    x = q if q is not None else k
    T, D = x.shape[0], x.shape[-1]
    outs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in (q, k)]
    if T == 0:
        return outs
    # a skipped tensor runs zero head iterations; its pointers are the other tensor's, never touched
    (qi, qo), (ki, ko) = ((t, o) if t is not None else (x, x) for t, o in zip((q, k), outs, strict=True))
    HQ = q.shape[1] if q is not None else 0
    HKV = k.shape[1] if k is not None else 0
    BT, BD, BHQ, BHK = _blocks(D, HQ, HKV)
    _rope_kernel[(cdiv(T, BT),)](qi, ki, cos, sin, qo, ko, qi.stride(0), qi.stride(1), ki.stride(0),
                                        ki.stride(1), cos.stride(0), sin.stride(0), T, HQ, HKV, D=D, BT=BT,
                                        BD=BD, BHQ=BHQ, BHK=BHK, BWD=bwd, num_warps=_NUM_WARPS)
    return outs


def rope_fwd(q, k, cos, sin):
    """Launch the forward: (q_out, k_out), contiguous, in q's / k's dtype."""
    return tuple(_launch(q, k, cos, sin, False))


def rope_bwd(dq_out, dk_out, cos, sin):
    """(dq, dk), contiguous; either upstream gradient may be None (its output was unused) and gives None."""
    dq_out, dk_out = (g if g is None or g.stride(-1) == 1 else g.contiguous() for g in (dq_out, dk_out))
    if dq_out is None and dk_out is None:
        return None, None
    return tuple(_launch(dq_out, dk_out, cos, sin, True))


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out, k_out = rope_fwd(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        # an unused output gets None, not zeros: no backward work for it, and its input gets no gradient, as in HF's
        # code, where q_out and k_out are separate graphs
        ctx.set_materialize_grads(False)
        return q_out, k_out

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq_out = dq_out if ctx.needs_input_grad[0] else None
        dk_out = dk_out if ctx.needs_input_grad[1] else None
        dq, dk = rope_bwd(dq_out, dk_out, cos, sin)
        return dq, dk, None, None


@on_input_device
def rope(q, k, cos, sin):
    """Apply rotary position embeddings to packed queries and keys in one kernel (Triton, forward and backward).

    Drop-in for Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin)`` of the Llama family (Llama, Mistral, Qwen2,
    Qwen3, Gemma: the same code) on the packed, token-major layout::

        rotate_half(x) = torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)
        q_out = q * cos + rotate_half(q) * sin      # cos, sin broadcast over the heads
        k_out = k * cos + rotate_half(k) * sin

    HF's tensors are ``[B, H, L, D]`` with cos / sin ``[B, L, D]``; here the batch is packed into T tokens and each
    token carries its own cos / sin row (the row of its position inside its sequence: ``cos[position_ids]`` flattened
    the same way as the tokens), so sequences of any lengths and positions mix freely.

    Args:
        q: ``[T, Hq, D]`` queries, float32, float16 or bfloat16. May be a view (e.g. ``x.view(T, Hq, D)`` of a
            projection output, a slice of a fused qkv tensor, or the transpose of an ``[Hq, T, D]`` tensor): any
            token and head strides are read in place, but the last dim must be contiguous (``stride(-1) == 1``).
        k: ``[T, Hkv, D]`` keys, q's dtype and device, same rules. ``Hkv`` need not equal ``Hq`` (GQA, MQA): each
            head is rotated on its own.
        cos: ``[T, D]`` (or ``[1, T, D]``, as ``LlamaRotaryEmbedding`` returns for one packed row) cosines, in q's
            dtype or float32. Rows may be strided (a stride of 0 repeats one row).
        sin: ``[T, D]`` or ``[1, T, D]`` sines, same rules as ``cos``. Neither needs HF's ``cat(freqs, freqs)``
            structure: the first and second halves of cos / sin are used separately, as in the formula above.

    Returns:
        ``(q_out, k_out)``: new contiguous tensors ``[T, Hq, D]`` and ``[T, Hkv, D]`` in q's dtype. Each element is
        computed in fp32 from the loaded values (cos / sin cast to fp32) and rounded once to the output dtype; HF
        rounds ``q * cos`` and ``rotate_half(q) * sin`` to bf16 / fp16 before adding them, so in low precision this
        is at least as close to the exact value as the HF code (bit-identical in fp32 up to fp32's last bit).

    Gradients flow to q and k (in their dtype, contiguous, fp32 math): with ``x1, x2`` the halves of a head and
    ``c1, c2, s1, s2`` the halves of cos / sin, the forward is ``y1 = x1 c1 - x2 s1``, ``y2 = x2 c2 + x1 s2``
    and the backward its transpose, ``dx1 = g1 c1 + g2 s2``, ``dx2 = g2 c2 - g1 s1``. cos and sin are rotary
    buffers and get no gradient from the kernel; when one of them requires grad (a learned or scaled table), the same
    fp32 computation runs through PyTorch autograd instead, so they get theirs. Only cos and sin are saved for the
    backward. An output that is not used costs no backward
    work and its input gets no gradient (``.grad`` stays None, as with HF's code). Unlike HF's code, where q_out and
    k_out are separate graphs, both come from one autograd node (one kernel): back-propagate through them in one
    pass, as attention does, or keep the graph (``retain_graph=True``) to go through them one after the other.
    T = 0 gives empty outputs and launches nothing.

    Raises:
        TypeError: an argument not a tensor; q not float16 / bfloat16 / float32; k's dtype not q's; cos or sin
            neither q's dtype nor float32.
        ValueError: q or k not 3-D, cos or sin not ``[T, D]`` / ``[1, T, D]`` or of different shapes, token counts
            or head dims that disagree (the message names the shapes), D odd or above 4096, tensors on different
            devices, or q / k with a non-contiguous last dim.
    """
    cos, sin = _check_rope_args(q, k, cos, sin)
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    _blocks(q.shape[-1], q.shape[1], k.shape[1])  # the launcher's limit on D, raised before any graph node is made
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        # learned or computed rotary tables: the kernel's backward has no cos / sin gradient, so the same fp32 math
        # (one rounding to q's dtype) runs through autograd instead, and every input gets its gradient
        qo, ko = rope_ref(q.float(), k.float(), cos.float(), sin.float())
        return qo.to(q.dtype), ko.to(k.dtype)
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    return RoPEFunction.apply(q, k, cos, sin)
