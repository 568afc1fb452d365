"""A leaner LoRA linear for training: ``fuse_lora(model)`` routes peft's LoRA ``Linear`` layers through one autograd
function, in place; peft's modules, adapter weights and checkpoints are untouched.

What peft's ``Linear`` runs for an adapter with dropout ``p``, under bf16 autocast with float32 adapter weights (the
default when the base is bf16)::

    result = base_layer(x)
    x32 = x.to(float32)                            # a float32 copy of x
    result = result + lora_B(lora_A(dropout(x32))) * scaling

keeps, per adapted layer, the dropped-out input (cast back to bf16 by autocast, for ``lora_A``'s weight gradient)
and the dropout's keep mask: 3 bytes per input element for each of q, k, v, o, gate, up and down, although q, k
and v (and gate and up) share one input. It also makes seven passes over input-sized and output-sized tensors
(copy, dropout, cast, ``lora_B``'s output, scale, add, and their backward counterparts).

:class:`LoRAAddFunction` computes the same value as ``result.addmm_(dropout(x) @ A.T, B.T, alpha=scaling)``: one
dropout pass in the compute dtype, the low-rank product accumulated into the base layer's output in place. For the
backward it keeps ``x`` itself (shared by every layer that reads it, so q, k and v keep one copy), the rank-``r``
product ``dropout(x) @ A.T`` and the random-number generator's state: on CUDA the backward regenerates the same keep
mask from that state instead of keeping it (on CPU, where Bernoulli sampling is slow, it keeps the mask as one byte
per element: ``KEEP_MASK_ON_CPU``). :func:`torch.utils.checkpoint`'s replay restores the same state, so the
function composes with gradient checkpointing.

On CUDA the dropout goes further (``DROPOUT_KERNEL``): :func:`llm2vec_fast.kernels.dropout_project` draws the keep
mask inside the rank-``r`` product's kernels from a Philox seed (taken from torch's CPU generator, so seeding and
checkpointing's replay reproduce it), and neither the mask nor the dropped-out copy is ever written: the forward
reads ``x`` once, the backward reads it once for ``A``'s gradient and writes ``x``'s gradient once, already masked.

Dropout draws from torch's own generators exactly as ``torch.nn.functional.dropout`` does on the same tensor, so on
CPU without autocast a fused layer drops the same elements as peft from the same seed, and its output and gradients
agree with peft's to float32 rounding (the fused accumulation rounds once where peft rounds twice); with autocast the
mask is drawn on the compute-dtype input (peft draws it on a float32 copy): the same distribution, other bits.

:func:`lora_gated_down` goes one step further for a gated MLP's down projection (used by ``fuse_ops``' gated MLP):
the activation ``silu(gate) * up`` is computed inside, and recomputed in the backward from gate and up (which the
activation's own backward keeps anyway) instead of being kept as the projection's input.

An input made by ``fuse_ops``' RMSNorm (q, k and v read one, gate and up the next) is not kept at all: the norm tags
its output with how to rebuild it from the norm's input, which the norm's own backward keeps anyway
(:func:`tag_recomputable`), and the first adapter backward to need it rebuilds it once for all its readers, bit for bit
(``RECOMPUTE_NORM_OUTPUTS``). That is 2 x hidden elements less per token per decoder layer for one extra norm pass
per norm in the backward.

A layer whose state the function does not cover keeps peft's forward at each call: adapters disabled or merged,
``adapter_names`` mixed batches, DoRA or other LoRA variants, a ``lora_B`` bias. :func:`unfuse_lora` restores peft's
forward everywhere.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ._patch import patch, patched, unpatch
from .kernels._launch import first_order_only  # torch only: no triton at import
from .kernels.reference import DROPOUT_PROJECT_MAX_RANK  # torch only: no triton at import


def fuse_lora(model):
    """Route every peft LoRA ``Linear`` layer of ``model`` through :class:`LoRAAddFunction`, in place; returns the
    model. Layers of other kinds (LoRA on embeddings or convolutions, plain modules) are left alone.

    Works on any device and dtype (it is PyTorch, not a Triton kernel). The adapter's weights, its state dict and
    what ``save_pretrained`` writes do not change; merging (``merge_and_unload``) works as with peft alone.
    """
    linear = _peft_lora_linear()
    if linear is None:
        return model
    for module in model.modules():
        if type(module) is linear:  # subclasses (quantized LoRA layers) keep their own forward
            patch(module, _fused_lora_forward)
    return model


def unfuse_lora(model):
    """Give every layer :func:`fuse_lora` changed peft's forward back; returns the model."""
    return unpatch(model, (_fused_lora_forward,))


def is_lora_fused(model) -> bool:
    """Whether :func:`fuse_lora` routed at least one layer of ``model``."""
    return any(patched(m) is _fused_lora_forward for m in model.modules())


def kept_bytes(fn, model) -> int:
    """Bytes autograd keeps for the backward while ``fn()`` runs, ``model``'s parameters excluded, each storage
    counted once: what a training step's activations cost, exactly (the fused LoRA's tests and
    ``benchmarks/bench_activation_memory.py`` measure with it)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _peft_lora_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is optional for encoding; nothing to fuse without it
        return None
    return Linear


def _fusable(module, args, kwargs):
    if args or kwargs or module.disable_adapters or module.merged:
        return False
    variants = getattr(module, "lora_variant", {})
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants or module.use_dora.get(name, False):
            return False
        a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return False
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return False
    return True


# bound by _patch.patch: a fused model still pickles and deep-copies
def _fused_lora_forward(module, x, *args, **kwargs):
    if not _fusable(module, args, kwargs):
        return type(module).forward(module, x, *args, **kwargs)
    module._check_forward_args(x)
    result = module.base_layer(x)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        drop = module.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        result = lora_add(result, x, module.lora_A[name].weight, module.lora_B[name].weight,
                          float(module.scaling[name]), p)
    return result


def lora_add(result, x, lora_a, lora_b, scaling, dropout_p=0.0):
    """``result += scaling * dropout(x) @ lora_a.T @ lora_b.T``, in place, differentiable in all four tensors.

    Args:
        result: ``[..., out]`` the base layer's output for ``x`` (a fresh tensor: it is written in place).
        x: ``[..., in]`` the layer's input.
        lora_a: ``[r, in]``, lora_b: ``[out, r]`` the adapter's weights (any float dtype).
        scaling: ``alpha / r``.
        dropout_p: dropout probability on ``x`` (0 = none), drawn as ``F.dropout`` draws it.

    The low-rank branch runs in the autocast dtype when autocast is on for ``x``'s device, else in ``lora_a``'s
    dtype (as peft casts ``x`` to the adapter's dtype). Returns ``result``.
    """
    if x.shape[-1] != lora_a.shape[1] or lora_b.shape[1] != lora_a.shape[0] or result.shape[-1] != lora_b.shape[0]:
        raise ValueError(f"LoRA shapes do not chain: x {tuple(x.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)}, result {tuple(result.shape)}; expected A [r, in], B [out, r]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not result.is_contiguous():
        result = result.contiguous()
    return LoRAAddFunction.apply(result, x, lora_a, lora_b, scaling, dropout_p, _recipe_of(x))


def _cast(t, dtype):
    # .to() of a tensor already in dtype returns it, but through the dispatcher: a few microseconds of host time per
    # call, and a LoRA layer makes about ten of them per step
    return t if t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type):
    # the low-rank branch runs in its compute dtype: autocast off inside, a context only where it is on
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else (
        contextlib.nullcontext())


def _compute_dtype(x, weight):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _rng_state(device):
    # what dropout on `device` draws from: the CPU generator, or this CUDA device's (whose state is its seed and
    # Philox offset, read without a device sync)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _dropout(x, p):
    """``F.dropout(x, p, training=True)``, drawn exactly as it draws, plus what its backward needs: ``(out, keep)``
    where ``keep`` is the CUDA kernel's bool mask or the CPU path's scaled noise (0 or ``1 / (1 - p)``)."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)  # at::dropout's CPU path: noise, scaled, times the input
    noise.div_(1 - p)
    return x * noise, noise


def _dropout_backward(grad, keep, p):
    if keep.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, keep, 1.0 / (1.0 - p))
    return grad * keep


# CPU tensors keep their dropout mask (1 byte per element) instead of regenerating it in the backward: CPU Bernoulli
# sampling costs more time than the mask costs memory there (a SmolLM2-sized MNTP step: +17 % time regenerated).
# CUDA's Philox draws are nearly free, so CUDA regenerates. Tests switch this off to cover regeneration on CPU.
KEEP_MASK_ON_CPU = True


# Where the dropout runs inside the rank-r product (llm2vec_fast.kernels.dropout_project: the keep mask drawn in the
# kernels from a Philox seed, never written): "auto" on CUDA tensors (unless LLM2VEC_FAST_DISABLE_TRITON=1),
# "triton" everywhere (CPU only under TRITON_INTERPRET=1; the tests), "off" never (torch's dropout, as above).
# The kernels' masks are not torch's: the same distribution, other bits.
DROPOUT_KERNEL = "auto"


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dropout_in_kernel(x, lora_a, cd):
    if (DROPOUT_KERNEL == "off" or lora_a.shape[0] > DROPOUT_PROJECT_MAX_RANK or cd not in _KERNEL_DTYPES
            or x.dtype not in _KERNEL_DTYPES):
        return False
    if DROPOUT_KERNEL == "triton":
        return True
    return x.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1"


def _lora_forward(out, x, lora_a, lora_b, scaling, p):
    """``out += scaling * dropout(x) @ A.T @ B.T`` on 2-D ``out`` (N, out) and ``x`` (N, in), in place; returns
    ``(xa, compute dtype, generator state, kept mask)``, what :func:`_lora_backward` needs besides ``x``: the state
    to regenerate the dropout mask from (the kernels' ``("philox", seed)``, or torch's generator state), or (CPU,
    see ``KEEP_MASK_ON_CPU``) the bool mask itself."""
    cd = _compute_dtype(x, lora_a)
    a, b = _cast(lora_a, cd), _cast(lora_b, cd)
    state = keep = None
    with _no_autocast(x.device.type):
        if p > 0 and _dropout_in_kernel(x, lora_a, cd):
            from llm2vec_fast.kernels.lora_project import dropout_project_fwd, new_seed

            state = ("philox", new_seed())
            xa = dropout_project_fwd(x, a, p, state[1])  # (N, r): x read once, no mask or copy written
            _add_product(out, xa, b, scaling, cd)
            return xa, cd, state, keep
        xin = _cast(x, cd)
        xd = xin
        if p > 0:
            if x.is_cuda or not KEEP_MASK_ON_CPU:
                state = _rng_state(x.device)
                xd = _dropout(xin, p)[0]
            else:
                xd, noise = _dropout(xin, p)
                keep = noise != 0
        xa = xd @ a.t()  # (N, r)
        del xd
        _add_product(out, xa, b, scaling, cd)
    return xa, cd, state, keep


def _add_product(out, xa, b, scaling, cd):
    if out.dtype == cd:
        out.addmm_(xa, b.t(), alpha=scaling)
    else:  # float32 adapter on a bf16 base without autocast: peft adds in float32, then rounds
        out.copy_(out + (xa @ b.t()) * scaling)


def _lora_backward(g, x, lora_a, lora_b, xa, scaling, p, cd, state, keep, need_x, need_a, need_b):
    """Gradients of :func:`_lora_forward` for the upstream ``g`` (N, out): ``(gx (N, in) in the compute dtype or
    None, gA, gB)``; the dropout mask is ``keep`` or regenerated from ``state``."""
    a, b = _cast(lora_a, cd), _cast(lora_b, cd)
    gx = ga = gb = None
    with _no_autocast(x.device.type):
        g = _cast(g, cd)
        gxa = (g @ b).mul_(scaling) if (need_x or need_a) else None  # (N, r)
        if need_b:
            gb = _cast((g.t() @ xa).mul_(scaling), lora_b.dtype)  # (out, r)
        if (need_x or need_a) and isinstance(state, tuple):  # the kernels' dropout: mask regenerated inside
            from llm2vec_fast.kernels.lora_project import dropout_project_bwd

            gx, ga = dropout_project_bwd(gxa, x, a, p, state[1], need_x, need_a)
            return gx, (_cast(ga, lora_a.dtype) if ga is not None else None), gb
        if need_x or need_a:
            xin = _cast(x, cd)
            if p > 0 and keep is not None:
                xin = _dropout_backward(xin, keep, p)  # x * mask / (1 - p): the forward's dropped-out input
            elif p > 0:
                devices = [x.device] if x.is_cuda else []
                with torch.random.fork_rng(devices=devices, device_type="cuda"):
                    if x.is_cuda:
                        torch.cuda.set_rng_state(state, x.device)
                    else:
                        torch.set_rng_state(state)
                    xin, keep = _dropout(xin, p)
            if need_a:
                ga = _cast(gxa.t() @ xin, lora_a.dtype)  # (r, in)
            del xin
            if need_x:
                gx = gxa @ a  # (N, in)
                if keep is not None:
                    gx = _dropout_backward(gx, keep, p)
    return gx, ga, gb


class LoRAAddFunction(torch.autograd.Function):
    """See :func:`lora_add`. Saves ``x`` (or, for a tensor tagged by :func:`tag_recomputable`, what rebuilds it),
    the rank-``r`` product and the generator state, never the dropped-out input or its mask; the backward
    regenerates them."""

    @staticmethod
    def forward(ctx, result, x, lora_a, lora_b, scaling, p, recipe=None):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa, cd, state, keep = _lora_forward(result.view(-1, result.shape[-1]), x2, lora_a, lora_b, scaling, p)
        ctx.mark_dirty(result)
        if recipe is None:
            ctx.save_for_backward(x, lora_a, lora_b, xa, keep)
            ctx.rebuild, ctx.n_in = None, 1
        else:  # x's inputs go through save_for_backward, so checkpointing and version checks see them
            inputs, rebuild = recipe
            rebuild.uses += 1
            ctx.save_for_backward(*inputs, lora_a, lora_b, xa, keep)
            ctx.rebuild, ctx.n_in = rebuild, len(inputs)
        ctx.scaling, ctx.p, ctx.cd, ctx.state = scaling, p, cd, state
        return result

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = ctx.n_in
        x = saved[0] if ctx.rebuild is None else ctx.rebuild(*saved[:n])
        lora_a, lora_b, xa, keep = saved[n:]
        gx, ga, gb = _lora_backward(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]), lora_a, lora_b, xa,
                                    ctx.scaling, ctx.p, ctx.cd, ctx.state, keep, *ctx.needs_input_grad[1:4])
        if gx is not None:
            gx = _cast(gx, x.dtype).view(x.shape)
        return grad, gx, ga, gb, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Inputs rebuilt in the backward. A decoder layer's RMSNorm output feeds q, k and v (and the next one gate and up): the
# adapters keep it for their weight gradients, 2 x hidden elements per token per layer, although the norm's own
# backward keeps its input anyway. fuse_ops' norm tags its output with how to rebuild it from that input and its
# weight (one memory-bound pass); the fused LoRA then keeps those instead, and the first adapter's backward to need it
# rebuilds it once for all the layers that read it.
# ---------------------------------------------------------------------------------------------------------------------
RECOMPUTE_NORM_OUTPUTS = True  # False: the fused LoRA keeps its input as saved (the tests compare both)
_TAG = "_llm2vec_fast_rebuild"


class _Rebuild:
    """``fn(*inputs)`` for the backward, under the autocast state of the forward that made the tensor, computed once
    for the ``uses`` adapters that saved it and dropped when the last of them has read it."""

    __slots__ = ("fn", "device", "autocast", "uses", "value")

    def __init__(self, fn, device, autocast):
        self.fn, self.device, self.autocast, self.uses, self.value = fn, device, autocast, 0, None

    def __call__(self, *inputs):
        if self.value is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device, dtype=dtype, enabled=enabled):
                self.value = self.fn(*inputs)
        value = self.value
        self.uses -= 1
        if self.uses <= 0:  # the last reader (or a second backward through a retained graph: it rebuilds again)
            self.value = None
        return value


def tag_recomputable(out, fn, *inputs):
    """Mark ``out`` (returned) as ``fn(*inputs)``, a deterministic function of tensors that autograd keeps anyway,
    so the fused LoRA layers that read ``out`` keep ``inputs`` instead and rebuild ``out`` in their backward (bit for
    bit: ``fn`` must compute exactly what made ``out``). Only while gradients are enabled; a later in-place change to
    ``out`` cancels the tag."""
    if torch.is_grad_enabled():
        dev = out.device.type
        rebuild = _Rebuild(fn, dev, (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        setattr(out, _TAG, (inputs, rebuild, out._version))
    return out


def _recipe_of(x):
    tag = getattr(x, _TAG, None) if RECOMPUTE_NORM_OUTPUTS else None
    if tag is None or tag[2] != x._version or not torch.is_grad_enabled():
        return None
    return tag[0], tag[1]


def lora_gated_down(gate, up, down, act):
    """``down(act(gate) * up)`` for a gated MLP whose ``down`` projection is a fused peft LoRA layer (see
    :func:`fuse_lora`) over an ``nn.Linear``, computed by :class:`GatedDownLoRAFunction`; None where that does not
    apply (the caller then runs the activation and ``down`` as usual).

    The activation's output ``h`` is the down projection's input: the unfused path keeps it for the adapter's
    weight gradient (as well as gate and up for the activation's own backward); this function keeps gate and up only
    and recomputes ``h`` in the backward (one elementwise pass), so each layer keeps one ``intermediate_size``-wide
    tensor less. ``act``: ``"silu"`` or ``"gelu_tanh"`` (the Triton activation kernels).
    """
    if not (patched(down) is _fused_lora_forward and _fusable(down, (), {})):
        return None
    names = [n for n in down.active_adapters if n in down.lora_A]
    if len(names) != 1 or type(down.base_layer) is not nn.Linear or gate.shape != up.shape:
        return None
    name = names[0]
    drop = down.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    base = down.base_layer
    return GatedDownLoRAFunction.apply(gate, up, base.weight, base.bias, down.lora_A[name].weight,
                                       down.lora_B[name].weight, float(down.scaling[name]), p, act)


class GatedDownLoRAFunction(torch.autograd.Function):
    """See :func:`lora_gated_down`: keeps gate, up, the rank-``r`` product and the generator state."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, p, act):
        from llm2vec_fast.kernels.swiglu import silu_mul_fwd

        gate, up = gate.contiguous(), up.contiguous()
        h = silu_mul_fwd(gate, up, act)  # (..., I)
        result = F.linear(h, weight, bias)  # the base projection, under the caller's autocast
        h2 = h.reshape(-1, h.shape[-1])
        xa, cd, state, keep = _lora_forward(result.view(-1, result.shape[-1]), h2, lora_a, lora_b, scaling, p)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, xa, keep)
        ctx.args = (scaling, p, cd, state, act, result.dtype, bias is not None)
        return result

    @staticmethod
    @first_order_only  # a double backward raises instead of silently dropping second-order terms
    def backward(ctx, grad):
        from llm2vec_fast.kernels.swiglu import silu_mul_bwd, silu_mul_fwd

        gate, up, weight, lora_a, lora_b, xa, keep = ctx.saved_tensors
        scaling, p, cd, state, act, ld, has_bias = ctx.args
        need_gate, need_up, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        need_h = need_gate or need_up
        h2 = silu_mul_fwd(gate, up, act).reshape(-1, gate.shape[-1])  # recomputed: (N, I)
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gw = gbias = gh = None
        with _no_autocast(gate.device.type):
            if need_h:
                gh = _cast(g, ld) @ _cast(weight, ld)  # (N, I), the base projection's input gradient
            if need_w:
                gw = _cast(_cast(g, ld).t() @ _cast(h2, ld), weight.dtype)
            if need_bias and has_bias:
                gbias = g.sum(0).to(weight.dtype)
        gx, ga, gb = _lora_backward(g, h2, lora_a, lora_b, xa, scaling, p, cd, state, keep, need_h, need_a, need_b)
        del h2
        dgate = dup = None
        if need_h:
            gh = gh.add_(_cast(gx, gh.dtype)) if gx is not None else gh
            dgate, dup = silu_mul_bwd(_cast(gh, gate.dtype).view(gate.shape), gate, up, act)
        return (dgate if need_gate else None, dup if need_up else None, gw, gbias, ga, gb, None, None, None)
