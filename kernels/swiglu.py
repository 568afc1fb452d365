"""Gated MLP activations fused into one pass over memory, forward and backward: SwiGLU's ``silu(gate) * up``
(Llama, Mistral, Qwen) and GeGLU's ``gelu_tanh(gate) * up`` (Gemma).

Layers: ``_silu_mul_fwd_kernel`` / ``_silu_mul_bwd_kernel`` (``ACT`` picks the activation) → ``silu_mul_fwd`` /
``silu_mul_bwd`` launchers → ``SiluMulFunction`` → :func:`silu_mul`, :func:`gelu_tanh_mul`. Twins:
:func:`llm2vec_fast.kernels.reference.silu_mul_ref`, :func:`~llm2vec_fast.kernels.reference.gelu_tanh_mul_ref`.

Elementwise over the flattened tensors, one 1-D grid of BLOCK-element programs with int64 offsets (an MLP's
``tokens x intermediate`` tensor passes 2^31 elements at 400k tokens of a 5.5k-wide MLP). The forward saves gate and
up only; the backward recomputes the sigmoid instead of storing it.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, first_order_only, on_input_device
from .reference import _check_silu_mul_args

BLOCK = 1024  # 8 values per thread at 4 warps: 16-byte loads of bf16 on the GPU
_NUM_WARPS = 4
ACTS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _act(b_g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32: silu, or GELU with the tanh approximation.

    gelu_tanh(g) = g (1 + tanh z) / 2 with z = c (g + a g^3) is g s with s = sigmoid(2 z), and its derivative
    s + 2 c g s (1 - s) (1 + 3 a g^2): no 1 + tanh or 1 - tanh^2 to cancel in the tails. 1 - s is sigmoid(-x)
    itself, not 1 minus a sigmoid that has rounded to 1 (worth ~1e-6 of the gradient where the gate is large)."""
    if ACT == 0:
        b_s = tl.sigmoid(b_g)
        return b_g * b_s, b_s * (1.0 + b_g * tl.sigmoid(-b_g))
    else:
        # 2 c = 2 sqrt(2 / pi) = 1.5957691216057308; a = 0.044715, 3 a = 0.134145
        b_z = 1.5957691216057308 * (b_g + 0.044715 * b_g * b_g * b_g)
        b_s = tl.sigmoid(b_z)
        b_d = b_s + 1.5957691216057308 * b_g * b_s * tl.sigmoid(-b_z) * (1.0 + 0.134145 * b_g * b_g)
        return b_g * b_s, b_d


@triton.jit
def _silu_mul_fwd_kernel(g, u, y, n, BLOCK: tl.constexpr, ACT: tl.constexpr):
    i_b = tl.program_id(0)
    o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    # [BLOCK] fp32 math, one rounding at the store (torch rounds act(gate) first, then the product)
    b_g = tl.load(g + o, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(u + o, mask=m, other=0.0).to(tl.float32)
    b_a, _ = _act(b_g, ACT)
    tl.store(y + o, (b_a * b_u).to(y.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_bwd_kernel(g, u, dy, dg, du, n, BLOCK: tl.constexpr, ACT: tl.constexpr):
    i_b = tl.program_id(0)
    o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    # [BLOCK]
    b_g = tl.load(g + o, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(u + o, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0.0).to(tl.float32)
    b_a, b_d = _act(b_g, ACT)
    tl.store(dg + o, (b_dy * b_u * b_d).to(dg.dtype.element_ty), mask=m)
    tl.store(du + o, (b_dy * b_a).to(du.dtype.element_ty), mask=m)


def silu_mul_fwd(gate, up, act="silu"):
    """Launch the forward on contiguous gate and up of one shape and dtype; returns y, same shape and dtype."""
    n = gate.numel()
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if n == 0:
        return y
    _silu_mul_fwd_kernel[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, ACT=ACTS[act], num_warps=_NUM_WARPS)
    return y


def silu_mul_bwd(dy, gate, up, act="silu"):
    """(d gate, d up), contiguous, in the inputs' dtype."""
    n = gate.numel()
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if n == 0:
        return dg, du
    dy = dy.contiguous()
    _silu_mul_bwd_kernel[(cdiv(n, BLOCK),)](gate, up, dy, dg, du, n, BLOCK=BLOCK, ACT=ACTS[act],
                                                    num_warps=_NUM_WARPS)
    return dg, du


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        y = silu_mul_fwd(gate, up, act)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = silu_mul_bwd(dy, gate, up, ctx.act)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None), None


@on_input_device
def silu_mul(gate, up):
    """``silu(gate) * up`` in one kernel (Triton, forward and backward): the activation of a SwiGLU MLP.

    Replaces the ``self.act_fn(self.gate_proj(x)) * self.up_proj(x)`` of Hugging Face's ``LlamaMLP`` (also
    Mistral, Qwen2, Qwen3; ``hidden_act="silu"``), which makes two full-size temporaries (``silu(gate)`` and the
    product) and reads them back; this reads gate and up once and writes the result once.

    Args:
        gate: the ``gate_proj`` output, any shape (e.g. ``[..., intermediate_size]``), float32, float16 or bfloat16.
        up: the ``up_proj`` output, the same shape and dtype as ``gate``.

    Returns:
        ``silu(gate) * up = gate * sigmoid(gate) * up``, same shape and dtype, contiguous. The math is fp32 and the
        result is rounded once to the input dtype (torch rounds ``silu(gate)`` first, then the product, so in
        fp16 / bf16 this is at least as close to the exact value as the HF code).

    Non-contiguous inputs are copied to contiguous ones first. Gradients (fp32 math, in the input dtype, contiguous):
    with ``s = sigmoid(gate)``, ``d gate = dy * up * s * (1 + gate * (1 - s))`` and ``d up = dy * gate * s``; only
    gate and up are saved, the sigmoid is recomputed. Any number of elements, 2^31 and beyond included.

    Raises:
        TypeError: ``gate`` or ``up`` not a float16 / bfloat16 / float32 tensor, or their dtypes differ.
        ValueError: their shapes differ (the message names both), or they are on different devices.
    """
    _check_silu_mul_args(gate, up)
    return SiluMulFunction.apply(gate.contiguous(), up.contiguous(), "silu")


@on_input_device
def gelu_tanh_mul(gate, up):
    """``gelu_tanh(gate) * up`` in one kernel (Triton, forward and backward): the activation of Gemma's GeGLU MLP.

    Replaces ``self.act_fn(self.gate_proj(x)) * self.up_proj(x)`` in Hugging Face's ``GemmaMLP`` / ``Gemma2MLP`` /
    ``Gemma3MLP`` (``hidden_activation="gelu_pytorch_tanh"``), with ``gelu_tanh(g) = g (1 + tanh(c (g + a g^3))) / 2``,
    ``c = sqrt(2 / pi)``, ``a = 0.044715`` (``F.gelu(g, approximate="tanh")``). Same arguments, shapes, dtypes,
    rounding (fp32 math, one rounding), gradients (``d up = dy * gelu_tanh(gate)``, ``d gate = dy * up *
    gelu_tanh'(gate)``, recomputed from the saved gate and up) and errors as :func:`silu_mul`.
    """
    _check_silu_mul_args(gate, up)
    return SiluMulFunction.apply(gate.contiguous(), up.contiguous(), "gelu_tanh")
