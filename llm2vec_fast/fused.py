"""Fused RMSNorm and SwiGLU for Hugging Face decoders: ``fuse_ops(model)``, in place, HF's modeling code untouched.

Hugging Face's ``LlamaRMSNorm`` runs five elementwise passes in float32 (upcast, square, mean, scale, downcast) and
its MLP two (``act_fn(gate) * up``); on a packed batch of 64k tokens these passes cost about as much device time as
the layer's attention. ``fuse_ops`` points each RMSNorm and SwiGLU MLP module of a supported family at the Triton ops
:func:`llm2vec_fast.kernels.rms_norm` (one read, one write) and :func:`llm2vec_fast.kernels.silu_mul` (the MLP's
projections stay ``nn.Linear``, or peft's LoRA layers wrapping them). The ops compute what HF computes, with the same
rounding points for RMSNorm, and their backward saves less (``x`` and one float per row instead of float32 copies).

Backends, as for attention: ``"auto"`` runs the kernels on CUDA tensors and HF's own forward elsewhere (so a model
moved to CPU keeps working), ``"triton"`` always runs them (CPU only under ``TRITON_INTERPRET=1``).
``LLM2VEC_FAST_DISABLE_TRITON=1`` turns ``"auto"`` off. :func:`unfuse_ops` restores HF's forwards.
"""
import functools
import os

from .bidirectional import FAMILIES

OPS = ("rms_norm", "swiglu")
FUSE_BACKENDS = ("auto", "triton")
_SILU = ("silu", "swish")


def fuse_ops(model, ops=OPS, backend: str = "auto"):
    """Route a decoder's RMSNorm and SwiGLU modules through the fused Triton ops, in place; returns the model.

    Args:
        model: a ``transformers`` decoder (base model, ``*ForCausalLM``, or wrapped by peft) of a family whose
            ``FAMILIES`` entry has ``fused_ops`` (Llama, Mistral, Qwen2, Qwen3; Gemma's norm and GELU MLP differ).
        ops: any of ``"rms_norm"`` and ``"swiglu"``.
        backend: ``"auto"`` (kernels on CUDA tensors, HF's forward elsewhere) or ``"triton"`` (always the kernels).

    A model of another family is returned unchanged. Raises ``ValueError`` for an unknown op or backend.
    """
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"unknown fused op(s) {bad}; expected any of {OPS}")
    if backend not in FUSE_BACKENDS:
        raise ValueError(f"unknown fused-op backend {backend!r}; expected one of {FUSE_BACKENDS}")
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or not family.fused_ops:
        return model
    silu = getattr(config, "hidden_act", None) in _SILU
    for module in model.modules():
        name = type(module).__name__
        if "rms_norm" in ops and name.endswith("RMSNorm") and _is_llama_norm(module):
            module.forward = functools.partial(_rms_norm_forward, module, backend)
        elif "swiglu" in ops and silu and name.endswith("MLP") and _is_swiglu_mlp(module):
            module.forward = functools.partial(_swiglu_forward, module, backend)
    return model


def unfuse_ops(model):
    """Give every module :func:`fuse_ops` changed its Hugging Face forward back; returns the model."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func in (_rms_norm_forward, _swiglu_forward):
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
            elif fwd.func is _swiglu_forward:
                found.add("swiglu")
    return tuple(op for op in OPS if op in found)


def _is_llama_norm(module):
    # HF's Llama-style norm: weight * normalize(x).to(x.dtype), epsilon in `variance_epsilon`
    weight = getattr(module, "weight", None)
    return hasattr(module, "variance_epsilon") and weight is not None and weight.ndim == 1


def _is_swiglu_mlp(module):
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _use_kernel(backend, x):
    if backend == "triton":
        return True
    return x.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1"


# module-level functions bound with functools.partial (not types.MethodType): a patched model still pickles, so
# encode worker processes (load="share") and copy.deepcopy get it whole
def _rms_norm_forward(module, backend, hidden_states):
    if not _use_kernel(backend, hidden_states):
        return type(module).forward(module, hidden_states)
    from llm2vec_fast.kernels import rms_norm

    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _swiglu_forward(module, backend, x):
    if not _use_kernel(backend, x):
        return type(module).forward(module, x)
    from llm2vec_fast.kernels import silu_mul

    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))
