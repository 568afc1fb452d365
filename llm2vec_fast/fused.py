"""Fused RMSNorm, gated-MLP activations and rotary embeddings for Hugging Face decoders: ``fuse_ops(model)``, in
place, HF's modeling code untouched.

Hugging Face's RMSNorm modules run five elementwise passes in float32 (upcast, square, mean, scale, downcast) and its
gated MLPs two (``act_fn(gate) * up``); on a packed batch of 64k tokens these passes cost about as much device time
as the layer's attention. ``fuse_ops`` points each RMSNorm and gated MLP module at the Triton ops
:func:`llm2vec_fast.kernels.rms_norm` (one read, one write; Llama's rounding, or Gemma's ``1 + weight`` with
``unit_offset``) and :func:`~llm2vec_fast.kernels.silu_mul` / :func:`~llm2vec_fast.kernels.gelu_tanh_mul` (SwiGLU
for Llama, Mistral and Qwen; GeGLU with the tanh GELU for Gemma). The MLP's projections stay ``nn.Linear``, or peft's
LoRA layers wrapping them. The ops compute what HF computes, with the same rounding points for RMSNorm, and their
backward saves less (``x`` and one float per row instead of float32 copies); a norm's output is tagged so that the
fused LoRA layers reading it (:mod:`llm2vec_fast.lora`) rebuild it in their backward instead of keeping it. A norm or
an activation of another kind (a LayerNorm, an exact GELU) keeps its HF forward.

HF's ``apply_rotary_pos_emb`` runs about seven elementwise passes over q and as many over k (two products, a
half-swap built from two slices, a negation and a concatenation, a sum). The ``"rope"`` op gives the attention
modules of Llama, Mistral, Qwen2, Qwen3 and Gemma 1-3 HF's forward with that call replaced by
:func:`llm2vec_fast.kernels.rope` (one read of q, k, cos and sin, one write, in float32 with one rounding) on packed
batches bound for llm2vec_fast's attention; its outputs come token-major ``[T, H, D]``, the layout the attention
kernel reads. Padded batches, KV caches and other attention implementations keep HF's forward.

Backends, as for attention: ``"auto"`` runs the kernels on CUDA tensors and HF's own forward elsewhere (so a model
moved to CPU keeps working), ``"triton"`` always runs them (CPU only under ``TRITON_INTERPRET=1``).
``LLM2VEC_FAST_DISABLE_TRITON=1`` turns ``"auto"`` off. :func:`unfuse_ops` restores HF's forwards.
"""
import functools
import os

from ._patch import patch, patched, unpatch
from .bidirectional import FAMILIES

OPS = ("rms_norm", "gated_mlp", "rope")
# attention modules whose forward is Hugging Face's Llama pattern (projections, optional per-head q/k norms, RoPE,
# the attention interface, o_proj): the "rope" op replaces their apply_rotary_pos_emb on packed batches
_ROPE_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                    "Gemma2Attention", "Gemma3Attention")
FUSE_BACKENDS = ("auto", "triton")
# HF activation modules by class name (transformers' ACT2FN): the kernels' activation for each
_ACTS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def fuse_ops(model, ops=OPS, backend: str = "auto"):
    """Route a decoder's RMSNorm, gated MLP and (Llama-pattern) attention modules through the fused Triton ops, in
    place; returns the model.

    Args:
        model: a ``transformers`` decoder (base model, ``*ForCausalLM``, or wrapped by peft) of a supported family
            (``FAMILIES``): Llama, Mistral, Qwen2, Qwen3 (RMSNorm, SwiGLU, RoPE), Gemma, Gemma 2, Gemma 3
            (``1 + weight`` RMSNorm, GeGLU, RoPE). Each module is matched by its kind, so one the ops do not cover
            keeps its forward.
        ops: any of ``"rms_norm"``, ``"gated_mlp"`` and ``"rope"``.
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
                patch(module, _rms_norm_forward, backend, style == "gemma")
        elif "gated_mlp" in ops and name.endswith("MLP") and _is_gated_mlp(module):
            act = _ACTS.get(type(module.act_fn).__name__)
            if act is not None:
                patch(module, _gated_mlp_forward, backend, act)
        elif "rope" in ops and name in _ROPE_ATTENTIONS:
            patch(module, _rope_attention_forward, backend)
    return model


def unfuse_ops(model):
    """Give every module :func:`fuse_ops` changed its Hugging Face forward back; returns the model."""
    return unpatch(model, _FORWARDS)


def fused_ops_of(model) -> tuple[str, ...]:
    """The ops :func:`fuse_ops` routed at least one module of ``model`` through."""
    found = {_FORWARDS.get(patched(module)) for module in model.modules()}
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


# module-level functions bound by _patch.patch (not types.MethodType): a patched model still pickles, so
# encode worker processes (load="share") and copy.deepcopy get it whole
def _rms_norm_forward(module, backend, unit_offset, hidden_states):
    from llm2vec_fast.lora import tag_recomputable

    if not _use_kernel(backend, hidden_states):
        fn = functools.partial(_hf_norm, module)
    else:
        fn = functools.partial(_kernel_norm, eps=module.eps if unit_offset else module.variance_epsilon,
                               unit_offset=unit_offset)
    # the fused LoRA layers reading the output keep hidden_states (which the norm's backward keeps anyway) and
    # rebuild the output in their backward, instead of keeping it
    return tag_recomputable(fn(hidden_states, module.weight), fn, hidden_states, module.weight)


def _hf_norm(module, x, weight):
    return type(module).forward(module, x)  # weight is module.weight, passed for the rebuild's saved inputs


def _kernel_norm(x, weight, eps, unit_offset):
    from llm2vec_fast.kernels import rms_norm

    return rms_norm(x, weight, eps, unit_offset=unit_offset)


def _gated_mlp_forward(module, backend, act, x):
    if not _use_kernel(backend, x):
        return type(module).forward(module, x)
    from llm2vec_fast import kernels
    from llm2vec_fast.lora import lora_gated_down

    gate, up = module.gate_proj(x), module.up_proj(x)
    # a fused-LoRA down projection takes the activation inside: its input is recomputed in the backward, not kept
    out = lora_gated_down(gate, up, module.down_proj, act)
    if out is not None:
        return out
    op = kernels.silu_mul if act == "silu" else kernels.gelu_tanh_mul
    return module.down_proj(op(gate, up))


def _attention_extras(module):
    """The window and softcap keywords that Hugging Face's own attention forward passes for ``module`` (transformers
    5.x): Mistral reads the window from its config, Qwen2/Qwen3/Gemma 2/Gemma 3 from the layer (None on full-attention
    layers); only Gemma 2 passes its logit softcap (Gemma 3's config carries ``attn_logit_softcapping`` unused)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    extra = {}
    if model_type == "mistral":
        extra["sliding_window"] = getattr(module.config, "sliding_window", None)
    elif hasattr(module, "sliding_window"):
        extra["sliding_window"] = module.sliding_window
    if model_type == "gemma2":
        extra["softcap"] = getattr(module, "attn_logit_softcapping", None)
    return extra


def _rope_attention_forward(module, backend, hidden_states, position_embeddings=None, attention_mask=None, *args,
                            **kwargs):
    # Hugging Face's forward with apply_rotary_pos_emb replaced by the fused kernel, on packed batches that go to
    # llm2vec_fast's attention; anything else (a padded batch, a KV cache, another attention implementation, CPU
    # tensors under "auto") runs HF's own forward
    from llm2vec_fast.bidirectional import (
        ATTN_IMPLEMENTATION,
        CAUSAL_IMPLEMENTATION,
        attention_forward,
        causal_attention_forward,
    )

    impl = getattr(module.config, "_attn_implementation", None)
    packed = (hidden_states.dim() == 3 and hidden_states.shape[0] == 1 and kwargs.get("cu_seq_lens_q") is not None)
    cached = args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    if (not packed or cached or position_embeddings is None or impl not in (ATTN_IMPLEMENTATION, CAUSAL_IMPLEMENTATION)
            or not _use_kernel(backend, hidden_states)):
        return type(module).forward(module, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from llm2vec_fast.kernels import rope

    T, D = hidden_states.shape[1], module.head_dim
    q = module.q_proj(hidden_states).view(T, -1, D)  # (T, Hq, D), views of the projections' outputs
    k = module.k_proj(hidden_states).view(T, -1, D)
    v = module.v_proj(hidden_states).view(T, -1, D)
    if hasattr(module, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head before the rotation
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = position_embeddings  # (1, T, D)
    q, k = rope(q, k, cos[0], sin[0])  # (T, H, D), contiguous: token-major, as the attention kernel reads best
    extra = _attention_extras(module)
    attend = attention_forward if impl == ATTN_IMPLEMENTATION else causal_attention_forward
    out, weights = attend(
        module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attention_mask,
        dropout=module.attention_dropout if module.training else 0.0, scaling=module.scaling, **extra, **kwargs)
    return module.o_proj(out.reshape(1, T, -1)), weights


_FORWARDS = {_rms_norm_forward: "rms_norm", _gated_mlp_forward: "gated_mlp", _rope_attention_forward: "rope"}
