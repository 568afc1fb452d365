"""Fused RMSNorm and gated-MLP activations for Hugging Face decoders: ``fuse_ops(model)``, in place, HF's modeling
code untouched.

Hugging Face's RMSNorm modules run five elementwise passes in float32 (upcast, square, mean, scale, downcast) and its
gated MLPs two (``act_fn(gate) * up``); on a packed batch of 64k tokens these passes cost about as much device time
as the layer's attention. ``fuse_ops`` points each RMSNorm and gated MLP module at the Triton ops
:func:`llm2vec_fast.kernels.rms_norm` (one read, one write; Llama's rounding, or Gemma's ``1 + weight`` with
``unit_offset``) and :func:`~llm2vec_fast.kernels.silu_mul` / :func:`~llm2vec_fast.kernels.gelu_tanh_mul` (SwiGLU
for Llama, Mistral and Qwen; GeGLU with the tanh GELU for Gemma). The MLP's projections stay ``nn.Linear``, or peft's
LoRA layers wrapping them. The ops compute what HF computes, with the same rounding points for RMSNorm, and their
backward saves less (``x`` and one float per row instead of float32 copies). A norm or an activation of another kind
(a LayerNorm, an exact GELU) keeps its HF forward.

Backends, as for attention: ``"auto"`` runs the kernels on CUDA tensors and HF's own forward elsewhere (so a model
moved to CPU keeps working), ``"triton"`` always runs them (CPU only under ``TRITON_INTERPRET=1``).
``LLM2VEC_FAST_DISABLE_TRITON=1`` turns ``"auto"`` off. :func:`unfuse_ops` restores HF's forwards.
"""
import functools
import os

from .bidirectional import FAMILIES

OPS = ("rms_norm", "gated_mlp")
FUSE_BACKENDS = ("auto", "triton")
# HF activation modules by class name (transformers' ACT2FN): the kernels' activation for each
_ACTS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def fuse_ops(model, ops=OPS, backend: str = "auto"):
    """Route a decoder's RMSNorm and gated MLP modules through the fused Triton ops, in place; returns the model.

    Args:
        model: a ``transformers`` decoder (base model, ``*ForCausalLM``, or wrapped by peft) of a supported family
            (``FAMILIES``): Llama, Mistral, Qwen2, Qwen3 (RMSNorm, SwiGLU), Gemma, Gemma 2, Gemma 3 (``1 + weight``
            RMSNorm, GeGLU). Each module is matched by its kind, so one the ops do not cover keeps its forward.
        ops: any of ``"rms_norm"`` and ``"gated_mlp"``.
        backend: ``"auto"`` (kernels on CUDA tensors, HF's forward elsewhere) or ``"triton"`` (always the kernels).

    A model of another family is returned unchanged. Raises ``ValueError`` for an unknown op or backend.
    """
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"unknown fused op(s) {bad}; expected any of {OPS}")
    if backend not in FUSE_BACKENDS:
        raise ValueError(f"unknown fused-op backend {backend!r}; expected one of {FUSE_BACKENDS}")
    if getattr(getattr(model, "config", None), "model_type", None) not in FAMILIES:
        return model
    for module in model.modules():
        name = type(module).__name__
        if "rms_norm" in ops and name.endswith("RMSNorm"):
            style = _norm_style(module)
            if style is not None:
                module.forward = functools.partial(_rms_norm_forward, module, backend, style == "gemma")
        elif "gated_mlp" in ops and name.endswith("MLP") and _is_gated_mlp(module):
            act = _ACTS.get(type(module.act_fn).__name__)
            if act is not None:
                module.forward = functools.partial(_gated_mlp_forward, module, backend, act)
    return model


def unfuse_ops(model):
    """Give every module :func:`fuse_ops` changed its Hugging Face forward back; returns the model."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func in (_rms_norm_forward, _gated_mlp_forward):
            del module.forward
    return model


def fused_ops_of(model) -> tuple[str, ...]:
    """The ops :func:`fuse_ops` routed at least one module of ``model`` through."""
    found = set()
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial):
            if fwd.func is _rms_norm_forward:
                found.add("rms_norm")
            elif fwd.func is _gated_mlp_forward:
                found.add("gated_mlp")
    return tuple(op for op in OPS if op in found)


def _norm_style(module):
    """"llama" (weight * normalize(x).to(x.dtype), epsilon in `variance_epsilon`), "gemma" ((1 + weight) in fp32,
    epsilon in `eps`) or None (anything else keeps its forward)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 1:
        return None
    if hasattr(module, "variance_epsilon"):
        return "llama"
    if type(module).__name__.startswith("Gemma") and hasattr(module, "eps"):
        return "gemma"
    return None


def _is_gated_mlp(module):
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _use_kernel(backend, x):
    if backend == "triton":
        return True
    return x.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1"


# module-level functions bound with functools.partial (not types.MethodType): a patched model still pickles, so
# encode worker processes (load="share") and copy.deepcopy get it whole
def _rms_norm_forward(module, backend, unit_offset, hidden_states):
    if not _use_kernel(backend, hidden_states):
        return type(module).forward(module, hidden_states)
    from llm2vec_fast.kernels import rms_norm

    eps = module.eps if unit_offset else module.variance_epsilon
    return rms_norm(hidden_states, module.weight, eps, unit_offset=unit_offset)


def _gated_mlp_forward(module, backend, act, x):
    if not _use_kernel(backend, x):
        return type(module).forward(module, x)
    from llm2vec_fast import kernels

    op = kernels.silu_mul if act == "silu" else kernels.gelu_tanh_mul
    return module.down_proj(op(module.gate_proj(x), module.up_proj(x)))
