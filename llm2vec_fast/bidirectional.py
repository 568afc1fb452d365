"""Bidirectional attention for Hugging Face decoders, through transformers' own extension points.

``to_bidirectional(model)`` registers one attention implementation, ``"llm2vec_fast"``, with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask builder), switches the model
to it and flips every attention module's ``is_causal`` flag. HF's modeling code stays untouched.

Two input forms reach the attention function:

* **packed** (native): one row of concatenated sequences, ``position_ids`` restarting at 0 per sequence and
  ``cu_seq_lens_q``/``max_length_q`` passed as model kwargs (transformers forwards them to the attention function).
  When only ``position_ids`` are given, the boundaries are derived from them.
* **padded**: a usual ``[B, T]`` batch with a 2D ``attention_mask``; the mask builder turns it into a key-padding mask
  (no causal part).

Backends: ``"torch"`` (reference: SDPA on a padded view, eager math for logit softcap), ``"triton"`` (the packed
flash-attention kernel, CUDA only), ``"flash_attn"`` (the optional flash-attn package's varlen function), and
``"auto"`` (triton on CUDA tensors, torch elsewhere), resolved per call from the tensors' device.

``to_packed_causal(model)`` is the same machinery with the decoder's causal mask kept (a second implementation,
``"llm2vec_fast_causal"``): the baseline an LLM2Vec conversion is compared with, run on packed batches per sequence
instead of through Hugging Face's ``[T, T]`` block-causal mask over the whole pack.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "llm2vec_fast"
CAUSAL_IMPLEMENTATION = "llm2vec_fast_causal"
BACKENDS = ("auto", "torch", "triton", "flash_attn")


@dataclass(frozen=True)
class Family:
    """Per-family differences only; everything else is HF's own modeling code."""

    # honour the config's sliding window (bidirectionally, |i - j| < window) on the layers HF marks as sliding
    sliding_window: bool = False


# model_type -> Family. Mistral/Qwen2 windows are ignored bidirectionally, as the original llm2vec does (causal
# models keep them).
FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma": Family(),
    "gemma2": Family(sliding_window=True),  # logit softcap arrives as the `softcap` kwarg from HF's attention
    "gemma3_text": Family(sliding_window=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def to_bidirectional(model, backend: str = "auto"):
    """Make a loaded HF decoder (base model or ``*ForCausalLM``) attend bidirectionally, in place; returns it.

    Args:
        model: a ``transformers`` model of a supported family (``SUPPORTED_MODEL_TYPES``), possibly wrapped by peft.
        backend: ``"auto"`` (Triton kernel for CUDA tensors, PyTorch otherwise), ``"torch"``, ``"triton"`` or
            ``"flash_attn"``.

    Raises:
        ValueError: unknown backend, or a model family that is not supported (the message lists the supported ones).
        ImportError: ``backend="flash_attn"`` without the flash-attn package.
    """
    return _convert(model, backend, causal=False)


def to_packed_causal(model, backend: str = "auto"):
    """Keep a decoder's causal attention but run it through llm2vec_fast's packed attention, in place; returns it.

    Packed batches then cost what their sequences cost: each token attends to the earlier tokens of its own sequence
    (the Triton kernel skips the key blocks above the diagonal), where Hugging Face's SDPA path builds a ``[T, T]``
    block-causal mask over the whole pack and computes every score in it. Padded batches get the causal mask plus
    key padding. Same arguments and errors as :func:`to_bidirectional`; ``LLM2Vec.from_pretrained(...,
    enable_bidirectional=False)`` uses it for the supported families.
    """
    return _convert(model, backend, causal=True)


def _convert(model, backend, causal):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "flash_attn":
        _import_flash_attn()
    what = "packed causal attention" if causal else "bidirectional conversion"
    if getattr(model, "config", None) is None:
        raise ValueError(f"{type(model).__name__} has no Hugging Face config: {what} takes a transformers decoder "
                         "model (or a PEFT model around one) of a supported family: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported for {what}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    register()
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal
    _set_implementation(model, CAUSAL_IMPLEMENTATION if causal else ATTN_IMPLEMENTATION)
    for cfg in _configs(model):
        cfg.llm2vec_fast_backend = backend
        # transformers >= 5.2x reads this to build bidirectional masks natively; older versions ignore it
        cfg.is_causal = causal
        if not causal and hasattr(cfg, "use_cache"):
            # an encoder has no use for a KV cache (a forward would fill one for nothing), and a forward that
            # carries one keeps Hugging Face's own attention forward instead of the fused RoPE path
            cfg.use_cache = False
    return model


def is_bidirectional(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def set_attention_dropout(model, p: float):
    """Attention dropout used in training mode (SimCSE uses 0.3); HF attention modules read ``attention_dropout``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    for cfg in _configs(model):
        cfg.attention_dropout = p
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model


def _configs(model):
    seen, out = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _set_implementation(model, name):
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, TypeError):
        pass
    for cfg in _configs(model):
        try:
            cfg._attn_implementation = name
        except AttributeError:
            cfg._attn_implementation_internal = name


_REGISTERED = False


def register():
    """Register the ``"llm2vec_fast"`` and ``"llm2vec_fast_causal"`` attention and mask functions with transformers
    (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionInterface.register(CAUSAL_IMPLEMENTATION, causal_attention_forward)
    # one mask builder for both: the causal part is applied inside the attention function, per sequence
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)
    AttentionMaskInterface.register(CAUSAL_IMPLEMENTATION, padding_mask)
    _REGISTERED = True


def padding_mask(*args, attention_mask=None, **kwargs):
    """Mask builder: a key-padding mask ``[B, 1, 1, kv]`` (True = attend), or None when nothing is padded.

    The causal (and HF packed-sequence) parts of the mask function HF passes are ignored on purpose: packed
    boundaries travel as ``cu_seq_lens_q`` instead.
    """
    if attention_mask is None or attention_mask.ndim != 2:
        return attention_mask
    attention_mask = attention_mask.bool()
    if bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of a packed row from positions that restart at 0: int32 cu_seqlens and max length."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def causal_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The function transformers calls for ``"llm2vec_fast_causal"``: :func:`attention_forward` with causal masking."""
    return attention_forward(module, query, key, value, attention_mask, _causal=True, **kwargs)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      sliding_window=None, _causal=False, **kwargs):
    """The function transformers calls for ``"llm2vec_fast"``: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``.

    Returns ``(out [B, T, Hq, D], None)`` as HF's attention functions do.
    """
    config = getattr(module, "config", None)
    backend = getattr(config, "llm2vec_fast_backend", "auto")
    model_type = getattr(config, "model_type", None)
    # the module's own flag decides (_convert sets it on every attention module of the model it converts): a second
    # model that shares the converted one's config object (two from_config calls on one config do) reaches this
    # function too, and its modules, still causal, keep it causal
    _causal = bool(getattr(module, "is_causal", _causal))
    if not _causal and not getattr(FAMILIES.get(model_type), "sliding_window", False):
        # bidirectional Mistral / Qwen2 attend to the whole sequence, as the original llm2vec does; a causal model
        # keeps its own window (to_packed_causal is the decoder's attention)
        sliding_window = None
    bsz, _, seq, dim = query.shape
    if key.shape[2] != seq:
        raise ValueError(f"llm2vec_fast attention encodes whole sequences: query length {seq} must equal key length "
                         f"{key.shape[2]} (no KV cache; pass use_cache=False)")
    scale = scaling if scaling is not None else dim ** -0.5
    softcap = float(softcap or 0.0)
    dropout = float(dropout or 0.0) if module.training else 0.0

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None and attention_mask is None and bsz == 1 and kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        if pos.shape[-1] == seq and bool((pos.reshape(-1)[1:] == 0).any()):
            cu, max_len = cu_seqlens_from_position_ids(pos)
    if cu is not None and bsz != 1:
        raise ValueError(f"packed input (cu_seq_lens_q given) must have batch size 1, got {bsz}")
    if cu is not None and max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())

    window = sliding_window if sliding_window and (max_len or seq) > sliding_window else None
    resolved = _resolve_backend(backend, query)

    if cu is None:
        # dense or padded batch
        keep = None
        if attention_mask is not None:
            # our mask builder gives bool; a user's own 4D float mask is additive (0 = attend)
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if resolved == "torch":
            return _torch_attention(query, key, value, keep, scale, softcap, dropout, window, _causal), None
        if keep is None:
            keep = torch.ones(bsz, seq, dtype=torch.bool, device=query.device)
        elif keep.shape[-2] != 1:
            raise ValueError(f"the {resolved!r} backend takes key-padding masks only, got a mask of shape "
                             f"{tuple(keep.shape)}; use backend='torch' for arbitrary masks")
        keep = keep.reshape(bsz, -1)
        lengths = keep.sum(-1)
        idx = keep.reshape(-1).nonzero().flatten()
        cu_p = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        q, k, v = (t.transpose(1, 2).reshape(bsz * seq, t.shape[1], dim)[idx] for t in (query, key, value))
        out = _packed_kernel(resolved, q, k, v, cu_p, int(lengths.max()), scale, softcap, dropout, _causal, window)
        full = out.new_zeros(bsz * seq, out.shape[1], dim)
        full[idx] = out
        return full.view(bsz, seq, -1, dim), None

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if resolved == "torch":
        out = packed_torch_attention(q, k, v, cu, int(max_len), scale, softcap, dropout, window, _causal)
    else:
        out = _packed_kernel(resolved, q, k, v, cu, int(max_len), scale, softcap, dropout, _causal, window)
    return out.unsqueeze(0), None


def _resolve_backend(backend, tensor):
    if backend == "auto":
        if tensor.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1":
            return "triton"
        return "torch"
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests of the kernel
    if backend in ("triton", "flash_attn") and not tensor.is_cuda and not interpreted:
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors, got device {tensor.device}; "
                         "use backend='torch' or 'auto' on CPU")
    return backend


def _window_size(window, causal):
    # a Hugging Face sliding window W as (left, right): |i - j| < W bidirectionally, i - W < j <= i causally
    if window is None:
        return (-1, -1)
    return (window - 1, 0 if causal else window - 1)


def _packed_kernel(backend, q, k, v, cu, max_len, scale, softcap, dropout, causal=False, window=None):
    if backend == "flash_attn":
        fa = _import_flash_attn()
        kw = {"softcap": softcap} if softcap else {}
        if window is not None:
            kw["window_size"] = _window_size(window, causal)
        return fa.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
                                         causal=causal, **kw)
    from llm2vec_fast.kernels import flash_attention

    return flash_attention(q, k, v, cu, max_len, scale=scale, softcap=softcap, dropout_p=dropout, causal=causal,
                           window_size=_window_size(window, causal))


def _import_flash_attn():
    try:
        import flash_attn
    except ImportError as e:
        raise ImportError("backend 'flash_attn' needs the flash-attn package: pip install flash-attn") from e
    return flash_attn


def packed_torch_attention(q, k, v, cu_seqlens, max_seqlen, scale, softcap=0.0, dropout=0.0, window=None,
                           causal=False):
    """Reference path for packed input ``[T, H, D]``: sequences of equal length are stacked and attended together
    without any mask, one SDPA call per distinct length.

    No padding means a sequence's result does not depend on its batch neighbours (a key-padding mask changes SDPA's
    blocking and hence its rounding, which 30 layers amplify to ~1e-3), and length-sorted batches hold few distinct
    lengths."""
    from .kernels.reference import validate_cu_seqlens

    total, hq, dim = q.shape
    # the kernels' checks, with their messages (this path reads the lengths on the host below anyway)
    cu_host = cu_seqlens.tolist()
    validate_cu_seqlens(cu_host, total, int(max_seqlen))
    # runs of neighbouring sequences of one length: where each length makes one run (encode packs its batches
    # longest first), every group is a slice of the pack, attended in place of a gather and a scatter of all tokens
    runs = []
    for a, b in zip(cu_host[:-1], cu_host[1:], strict=True):
        if runs and runs[-1][0] == b - a:
            runs[-1][1] += 1
        else:
            runs.append([b - a, 1, a])
    if len({length for length, _, _ in runs}) == len(runs):
        out = torch.empty_like(q)
        for length, n, start in sorted(runs):  # ascending lengths: the groups (and dropout draws) of the path below
            if length == 0:
                continue
            span = slice(start, start + n * length)
            grp = [t[span].reshape(n, length, t.shape[1], dim).transpose(1, 2) for t in (q, k, v)]
            out[span] = _torch_attention(*grp, None, scale, softcap, dropout, window, causal).reshape(n * length, hq,
                                                                                                     dim)
        return out
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # tokens reordered so that sequences of one length are contiguous: [group of n_L sequences × L tokens] ...
    seq_order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[seq_order]
    tok_src = torch.repeat_interleave(cu_seqlens[:-1].long()[seq_order], sorted_len, output_size=total)
    tok_src = tok_src + torch.arange(total, device=q.device) - torch.repeat_interleave(
        F.pad(sorted_len.cumsum(0), (1, 0))[:-1], sorted_len, output_size=total)
    uniq, counts = torch.unique_consecutive(sorted_len, return_counts=True)
    qs, ks, vs = q[tok_src], k[tok_src], v[tok_src]
    outs, at = [], 0
    for length, n in zip(uniq.tolist(), counts.tolist(), strict=True):
        span = slice(at, at + n * length)
        at += n * length
        if length == 0:
            continue
        grp = [t[span].view(n, length, t.shape[1], dim).transpose(1, 2) for t in (qs, ks, vs)]
        outs.append(_torch_attention(*grp, None, scale, softcap, dropout, window, causal).reshape(n * length, hq,
                                                                                                   dim))
    out = torch.empty_like(q)
    out[tok_src] = torch.cat(outs) if outs else q.new_zeros(0, hq, dim)
    return out


def _torch_attention(q, k, v, keep, scale, softcap, dropout, window, causal=False):
    """q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``; keep: None, ``[B, L]`` or a broadcastable 4D bool key mask.
    Returns ``[B, L, Hq, D]``."""
    bsz, hq, seq, dim = q.shape
    mask = None
    if keep is not None:
        mask = keep if keep.ndim == 4 else keep[:, None, None, :]
    i = torch.arange(seq, device=q.device) if window is not None or causal else None
    if window is not None:
        band = (i[:, None] - i[None, :]).abs() < window
        mask = band[None, None] if mask is None else (mask & band[None, None])
    if causal and mask is not None:
        # every query keeps at least itself: a left-padded row would otherwise see no key and turn into NaN, which
        # the next layer's values would carry into real rows (0 · NaN)
        mask = (mask & (i[:, None] >= i[None, :])) | (i[:, None] == i[None, :])
    is_causal = causal and mask is None
    if softcap:
        g = hq // k.shape[1]
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif is_causal:
            scores = scores.masked_fill(i[:, None] < i[None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs)  # fully masked (padding) query rows
        if dropout:
            probs = F.dropout(probs, p=dropout)
        out = torch.matmul(probs.to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             is_causal=is_causal, enable_gqa=k.shape[1] != hq)
    return out.transpose(1, 2)
