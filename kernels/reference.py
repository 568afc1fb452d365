"""Plain PyTorch twins of every public kernel op, same signatures: the parity oracle and the CPU backend.

Only torch is imported here, never triton or transformers.
"""
import math
import numbers
import weakref

import torch
import torch.nn.functional as F

from ._launch import new_seed, version_of


# ==== ATTENTION (flash_attention_ref) ====
def check_attention_args(q, k, v, cu_seqlens, max_seqlen, *, scale=None, softcap=0.0, dropout_p=0.0, dtypes=None,
                         window_size=(-1, -1), causal=False, return_lse=False):
    """The argument checks ``flash_attention`` and its twin share (types, shapes, devices, GQA, dropout, softcap,
    scale); the kernel adds its own (dtypes, head dims, layout, CUDA). Values of ``cu_seqlens`` are checked on the
    host by :func:`validate_cu_seqlens`."""
    for name, x in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, head_dim], got shape {tuple(x.shape)}")
    if dtypes is not None and q.dtype not in dtypes:
        raise TypeError(f"q.dtype must be one of {', '.join(str(d).replace('torch.', '') for d in dtypes)}, got "
                        f"{q.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        if not (isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1
                and not max_seqlen.is_floating_point()):  # a 0-d int tensor (some HF paths pass one) is read once
            raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    devices = {x.device for x in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v and cu_seqlens must be on one device, got q {q.device}, k {k.device}, v {v.device}, "
                         f"cu_seqlens {cu_seqlens.device}")
    T, HQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != T:
        raise ValueError(f"k/v must have total_tokens = q.shape[0] = {T} rows, got {k.shape[0]}")
    if k.shape[2] != D:
        raise ValueError(f"k/v head_dim must equal q's ({D}), got {k.shape[2]}")
    HKV = k.shape[1]
    if HKV == 0 or HQ % HKV != 0:
        raise ValueError(f"the number of query heads ({HQ}) must be a multiple of the number of kv heads ({HKV})")
    check_dropout_p(dropout_p)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    for name, x in (("softcap", softcap), ("scale", scale)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
        try:
            float(x) if x is not None else None
        except OverflowError:
            raise ValueError(f"{name} must be a finite number, got {x!r}") from None
    if not (math.isfinite(float(softcap)) and float(softcap) >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap}")
    if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints >= 0 or -1 for an unlimited side, got "
                         f"{window_size!r}")


def check_dropout_p(dropout_p) -> None:
    """A probability in [0, 1), given as a real number (a string or a bool is a TypeError, not a truthy value)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a number in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_seed(seed) -> None:
    """A Philox seed: an int (or None: drawn from torch's generator)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")


def check_flag(name, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def validate_cu_seqlens(cu, total_tokens, max_seqlen):
    """Check the host list ``cu`` of ``cu_seqlens`` against the pack; returns the sequence lengths."""
    if len(cu) < 1 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[:4]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    bad = [i for i, n in enumerate(lens) if n < 0]
    if bad:
        i = bad[0]
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={cu[i]} > cu_seqlens[{i + 1}]="
                         f"{cu[i + 1]}")
    if cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens[-1] must equal total_tokens = q.shape[0] = {total_tokens}, got {cu[-1]}")
    longest = max(lens, default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens ({longest})")
    return lens


def flash_attention_ref(q, k, v, cu_seqlens, max_seqlen, *, scale=None, softcap=0.0, dropout_p=0.0, seed=None,
                        return_lse=False, causal=False, window_size=(-1, -1), _dropout_mask=None, _upcast=True):
    """Plain PyTorch twin of :func:`llm2vec_fast.kernels.flash_attention` (same signature and semantics).

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` packed; ``cu_seqlens`` int32 ``[B + 1]``. Each sequence attends to itself
    only, bidirectionally (``causal=True``: token i of a sequence sees its tokens 0..i; ``window_size`` ``(left,
    right)``: only keys ``i - left .. i + right``, -1 unlimited). Scores and softmax in fp32,
    output in the input dtype; lse ``[Hq, T]`` fp32. Dropout is drawn from a torch generator seeded with ``seed`` (same
    distribution as the kernel, not the same bits); the private ``_dropout_mask`` (bool ``[Hq, T, T]``, True = kept,
    e.g. from ``attention.dropout_keep_mask``) replaces the draw so that a test can compare against the kernel's exact
    mask. ``_upcast=False`` keeps both matmuls in the input dtype (softmax still fp32, P rounded to the input dtype
    before P·V, like a flash kernel): tests use it as the low-precision reference whose error sets the tolerance.
    Differentiable through autograd.
    """
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, scale=scale, softcap=softcap, dropout_p=dropout_p,
                         window_size=window_size, causal=causal, return_lse=return_lse)
    check_seed(seed)
    T, HQ, D = q.shape
    left, right = (-1 if w >= T else w for w in window_size)  # no in-sequence distance reaches T: unlimited
    HKV = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cu = cu_seqlens.tolist()
    validate_cu_seqlens(cu, T, int(max_seqlen))
    gen = None
    if dropout_p > 0 and _dropout_mask is None:
        if seed is None:
            seed = new_seed()
        gen = torch.Generator(device=q.device).manual_seed(int(seed) % (1 << 63))
    # GQA: query head i reads kv head i // G
    cdt = torch.float32 if _upcast else q.dtype  # matmul dtype
    kf = k.to(cdt).repeat_interleave(HQ // HKV, dim=1)
    vf = v.to(cdt).repeat_interleave(HQ // HKV, dim=1)
    qf = q.to(cdt)
    outs, lses = [], []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (qf, kf, vf))  # (H, L, D)
        s = (qs @ ks.transpose(-1, -2)).float() * scale  # (H, L, L)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        if left >= 0 or right >= 0:
            i = torch.arange(b - a, device=s.device)
            dist = i[:, None] - i[None, :]  # query - key
            outside = ((dist > left) if left >= 0 else torch.zeros_like(dist, dtype=torch.bool)) \
                | ((-dist > right) if right >= 0 else torch.zeros_like(dist, dtype=torch.bool))
            s = s.masked_fill(outside, float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1))  # (H, L)
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            if _dropout_mask is not None:
                keep = _dropout_mask[:, a:b, a:b].to(p.device)
            else:
                keep = torch.rand(p.shape, generator=gen, device=p.device) >= dropout_p
            p = p * keep / (1.0 - dropout_p)
        outs.append((p.to(cdt) @ vs).transpose(0, 1))  # (L, H, D)
    # an empty pack (no sequences) still returns an output in the graph of q, k and v (zero-size gradients)
    o = torch.cat(outs, 0).to(q.dtype) if outs else q * 0 + (k.sum() + v.sum()) * 0
    lse = torch.cat(lses, 1) if lses else q.new_zeros((HQ, T), dtype=torch.float32)
    return (o, lse) if return_lse else o
# ==== END ATTENTION ====

# ==== POOLING (masked_pool_ref) ====
POOL_MODES = {"mean": "mean", "weighted_mean": "weighted_mean", "last_token": "last_token", "eos_token": "last_token",
              "first_token": "first_token", "bos_token": "first_token"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_pool_args(hidden, cu_seqlens, mode, pool_start, dtypes=_FLOAT_DTYPES):
    """Validate masked_pool arguments (shared by the kernel and the twin); returns the canonical mode name."""
    if not isinstance(mode, str) or mode not in POOL_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {sorted(POOL_MODES)}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D packed tensor [total_tokens, D], got {shape}")
    if hidden.dtype not in dtypes:
        raise TypeError(f"hidden must be one of {[str(d) for d in dtypes]}, got {hidden.dtype}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B + 1], got {shape}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    B = cu_seqlens.numel() - 1
    if pool_start is not None:
        if not isinstance(pool_start, torch.Tensor) or tuple(pool_start.shape) != (B,):
            shape = tuple(pool_start.shape) if isinstance(pool_start, torch.Tensor) else type(pool_start).__name__
            raise ValueError(f"pool_start must have shape ({B},) (one offset per sequence), got {shape}")
        if pool_start.dtype != torch.int32:
            raise TypeError(f"pool_start must be int32, got {pool_start.dtype}")
        if pool_start.device != hidden.device:
            raise ValueError(f"pool_start is on {pool_start.device} but hidden is on {hidden.device}")
    if not _primed(cu_seqlens, pool_start, hidden.shape[0]):
        _check_pool_values(cu_seqlens, pool_start, hidden.shape[0])
    return POOL_MODES[mode]


def _check_pool_values(cu_seqlens, pool_start, total):
    """cu_seqlens a prefix sum of ``total`` tokens starting at 0, each pool_start in [0, length]: one host sync for
    every check on a device tensor; the detailed (slower) search runs only when something is wrong."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    bad = (cu[0] != 0) | (cu[-1] != total) | (lengths < 0).any()
    if pool_start is not None:
        bad = bad | (pool_start < 0).any() | (pool_start.long() > lengths).any()
    if not bool(bad):
        return
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
    if (lengths < 0).any():
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu[i])} > "
                         f"cu_seqlens[{i + 1}] = {int(cu[i + 1])}")
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] = {int(cu[-1])} must equal the number of packed tokens "
                         f"hidden.shape[0] = {total}")
    ps = pool_start.long()
    if (ps < 0).any():
        i = int(torch.nonzero(ps < 0)[0])
        raise ValueError(f"pool_start must be >= 0, got pool_start[{i}] = {int(ps[i])}")
    i = int(torch.nonzero(ps > lengths)[0])
    raise ValueError(f"pool_start[{i}] = {int(ps[i])} is beyond the length {int(lengths[i])} of sequence {i}")


# one-entry cache, as the attention's (prime_seq_info): a batch's cu_seqlens and pool_start validated from their host
# copies, so pooling them copies nothing back (a device synchronisation per batch that stalls the host's launches)
_POOL_PRIMED = {"refs": None, "key": None}


def _pool_key(cu_seqlens, pool_start, total):
    def one(t):
        return None if t is None else (version_of(t), t.data_ptr())

    return one(cu_seqlens), one(pool_start), int(total)


def prime_pool_args(cu_seqlens, pool_start, cu_host, pool_start_host=None):
    """Tell ``masked_pool`` (and its twin) the host copies (lists, numpy arrays or CPU tensors) of the device tensors
    ``cu_seqlens`` and ``pool_start`` (or None) it will be called with next: they are validated here, on the host,
    and the call then reads nothing back from the device. Raises what ``masked_pool`` raises for bad values. A later
    in-place change to either tensor drops the primed copies (they are validated again); tensors made under
    ``torch.inference_mode`` have no version counter, so for them the primed copies serve the next call only."""
    cu = torch.as_tensor(cu_host).reshape(-1).to(torch.int64)
    if cu.numel() != cu_seqlens.numel() or cu.numel() < 1:
        raise ValueError(f"cu_host has {cu.numel()} entries, cu_seqlens {cu_seqlens.numel()}")
    ps = None
    if pool_start is not None:
        if pool_start_host is None:
            raise ValueError("pool_start is given but pool_start_host is not")
        ps = torch.as_tensor(pool_start_host).reshape(-1).to(torch.int64)
        if ps.numel() != pool_start.numel():
            raise ValueError(f"pool_start_host has {ps.numel()} entries, pool_start {pool_start.numel()}")
    total = int(cu[-1])
    _check_pool_values(cu, ps, total)
    _POOL_PRIMED.update(refs=(weakref.ref(cu_seqlens), None if pool_start is None else weakref.ref(pool_start)),
                        key=_pool_key(cu_seqlens, pool_start, total))


def _primed(cu_seqlens, pool_start, total):
    refs = _POOL_PRIMED["refs"]
    if refs is None or refs[0]() is not cu_seqlens or (refs[1]() if refs[1] is not None else None) is not pool_start:
        return False
    if _POOL_PRIMED["key"] != _pool_key(cu_seqlens, pool_start, total):
        return False
    if cu_seqlens.is_inference() or (pool_start is not None and pool_start.is_inference()):
        # no version counter to see an in-place change: a primed copy serves one pooling call (a batch's)
        _POOL_PRIMED.update(refs=None, key=None)
    return True


def masked_pool_ref(hidden, cu_seqlens, mode="mean", pool_start=None, normalize=False):
    """PyTorch twin of :func:`llm2vec_fast.kernels.masked_pool` (same arguments, semantics and errors).

    Vectorised (no per-sequence loop): each token gets its pooling weight, then one ``index_add`` per batch. fp32
    math (float64 inputs, accepted here only, stay float64), output in ``hidden.dtype``. Empty pooled spans give zero
    vectors (also after ``normalize``).
    """
    mode = _check_pool_args(hidden, cu_seqlens, mode, pool_start, _FLOAT_DTYPES + (torch.float64,))
    check_flag("normalize", normalize)
    T, D = hidden.shape
    B = cu_seqlens.numel() - 1
    dev = hidden.device
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]  # (B,)
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lengths)  # (T,) sequence id of each token
    pos = torch.arange(T, device=dev) - starts[seg]  # (T,) position inside its sequence
    ps = pool_start.long() if pool_start is not None else torch.zeros(B, dtype=torch.long, device=dev)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = (lengths - ps).to(acc)  # (B,) pooled tokens per sequence
    rank = (pos - ps[seg] + 1).to(acc)  # (T,) 1-based rank inside the pooled span, <= 0 before it
    if mode == "mean":
        w = (rank >= 1).to(acc) / n.clamp(min=1)[seg]
    elif mode == "weighted_mean":
        w = rank.clamp(min=0) / (n * (n + 1) / 2).clamp(min=1)[seg]
    elif mode == "last_token":
        w = (pos == lengths[seg] - 1).to(acc)
    else:  # first_token
        w = (pos == 0).to(acc)
    # tokens outside the pooled span are selected away, not multiplied by 0: an inf or NaN there (an instruction token
    # overflowing in fp16) must not reach the embedding, as it does not in the kernel
    x = torch.where(w[:, None] != 0, hidden.to(acc) * w[:, None], 0.0)
    out = torch.zeros(B, D, dtype=acc, device=dev).index_add(0, seg, x)
    if normalize:
        out = F.normalize(out, dim=-1, eps=1e-12)
    return out.to(hidden.dtype)
# ==== END POOLING ====

# ==== CROSS ENTROPY (fused_linear_cross_entropy_ref) ====
def _check_ce_args(hidden, weight, labels, ignore_index, bias, dtypes=_FLOAT_DTYPES):
    """Validate fused_linear_cross_entropy arguments (shared by kernel and twin); returns the number of valid rows.

    One host sync: the label range check and the count of non-ignored rows are read back together.
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (the label value of rows left out), got "
                        f"{type(ignore_index).__name__} {ignore_index!r}")
    for name, t, dim in (("hidden", hidden, 2), ("weight", weight, 2), ("labels", labels, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {dim}-D tensor, got {shape}")
    if hidden.dtype not in dtypes:
        raise TypeError(f"hidden must be one of {[str(d) for d in dtypes]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}] to match hidden [N, {H}], got {tuple(weight.shape)}")
    if labels.shape[0] != N:
        raise ValueError(f"labels must have {N} entries (one per hidden row), got {labels.shape[0]}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({V},), got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {V}) and is not "
                         f"ignore_index ({ignore_index})")
    return n_valid


def fused_linear_cross_entropy_ref(hidden, weight, labels, *, ignore_index=-100, bias=None):
    """PyTorch twin of :func:`llm2vec_fast.kernels.fused_linear_cross_entropy`: full fp32 logits + F.cross_entropy.

    Mean over the non-ignored rows; when every row is ignored the loss is 0.0 with zero gradients (F.cross_entropy
    would give NaN). Returns a float32 scalar (float64 inputs, accepted here only, stay float64).
    """
    n_valid = _check_ce_args(hidden, weight, labels, ignore_index, bias, _FLOAT_DTYPES + (torch.float64,))
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden.to(acc), weight.to(acc), bias.to(acc) if bias is not None else None)  # (N, V)
    if n_valid == 0:
        return logits.sum() * 0.0  # keeps the graph so that every input gets a zero gradient
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="mean")
# ==== END CROSS ENTROPY ====

# ==== RMS NORM (rms_norm_ref) ====
def _check_rms_norm_args(x, weight, eps, dtypes=_FLOAT_DTYPES):
    """Validate rms_norm arguments (shared by the kernel and the twin)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D], got a 0-d tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x of shape {tuple(x.shape)} [..., D], "
                         f"got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")


def rms_norm_ref(x, weight, eps=1e-6, *, unit_offset=False):
    """PyTorch twin of :func:`llm2vec_fast.kernels.rms_norm`: Hugging Face's ``LlamaRMSNorm.forward`` (or, with
    ``unit_offset``, ``GemmaRMSNorm.forward``), verbatim.

    fp32 math (float64 inputs, accepted here only, stay float64). Llama: the normalised value is rounded to x's dtype
    and then multiplied by the weight, so the output is in ``torch.promote_types(weight.dtype, x.dtype)``. Gemma: the
    scale is ``1 + weight`` in fp32 and the product is rounded once to x's dtype.
    """
    _check_rms_norm_args(x, weight, eps, _FLOAT_DTYPES + (torch.float64,))
    check_flag("unit_offset", unit_offset)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc)  # (..., D)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.to(acc))).type_as(x)
    return weight * h.to(x.dtype)
# ==== END RMS NORM ====

# ==== GATED MLP ACTIVATIONS (silu_mul_ref, gelu_tanh_mul_ref) ====
def _check_silu_mul_args(gate, up, dtypes=_FLOAT_DTYPES):
    """Validate silu_mul arguments (shared by the kernel and the twin)."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have the same dtype, got gate {gate.dtype} and up {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")


def silu_mul_ref(gate, up):
    """PyTorch twin of :func:`llm2vec_fast.kernels.silu_mul`: ``F.silu(gate) * up``, as HF's SwiGLU MLP computes it.

    Math in the input dtype (torch rounds ``silu(gate)`` to it before the product: two roundings where the kernel
    has one); float64 accepted here only.
    """
    _check_silu_mul_args(gate, up, _FLOAT_DTYPES + (torch.float64,))
    return F.silu(gate) * up


def gelu_tanh_mul_ref(gate, up):
    """PyTorch twin of :func:`llm2vec_fast.kernels.gelu_tanh_mul`: ``F.gelu(gate, approximate="tanh") * up``, as
    Gemma's GeGLU MLP (``hidden_activation="gelu_pytorch_tanh"``) computes it; math in the input dtype."""
    _check_silu_mul_args(gate, up, _FLOAT_DTYPES + (torch.float64,))
    return F.gelu(gate, approximate="tanh") * up
# ==== END SWIGLU ====

# ==== ROTARY POSITION EMBEDDING (rope_ref) ====
def _check_rope_args(q, k, cos, sin, dtypes=_FLOAT_DTYPES):
    """Validate rope arguments (shared by the kernel and the twin); returns cos and sin as ``[T, D]``."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in dtypes:
        raise TypeError(f"q must be one of {[str(d) for d in dtypes]}, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype, got q {q.dtype} and k {k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (q.dtype, torch.float32):
            allowed = "torch.float32" if q.dtype == torch.float32 else f"q's dtype ({q.dtype}) or torch.float32"
            raise TypeError(f"{name} must be {allowed}, got {t.dtype}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D packed tensor [T, H, D], got shape {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got cos {tuple(cos.shape)} and sin "
                         f"{tuple(sin.shape)}")
    if not (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == 1)):
        raise ValueError(f"cos and sin must be [T, D] or [1, T, D], got shape {tuple(cos.shape)}")
    if cos.dim() == 3:
        cos, sin = cos[0], sin[0]
    if not q.shape[0] == k.shape[0] == cos.shape[0]:
        raise ValueError(f"q, k and cos / sin must have the same number of tokens T (dim 0), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)} and cos {tuple(cos.shape)}")
    if not q.shape[-1] == k.shape[-1] == cos.shape[-1]:
        raise ValueError(f"q, k and cos / sin must have the same head dim D (last dim), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} and cos {tuple(cos.shape)}")
    D = q.shape[-1]
    if D % 2 != 0 or D == 0:
        raise ValueError(f"the head dim D must be even and positive (it is rotated in two halves), got D={D}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return cos, sin


def rope_ref(q, k, cos, sin):
    """PyTorch twin of :func:`llm2vec_fast.kernels.rope`: Hugging Face's ``apply_rotary_pos_emb`` on the packed
    ``[T, H, D]`` layout, as HF writes it.

    cos / sin (``[T, D]`` or ``[1, T, D]``) are cast to q's dtype and broadcast over the heads; ``x * cos +
    rotate_half(x) * sin`` is computed in the input dtype (each product rounded, then the sum: HF's roundings);
    float64 accepted here only. Returns contiguous ``(q_out, k_out)``. Differentiable through autograd (cos and sin
    too, where they require grad).
    """
    cos, sin = _check_rope_args(q, k, cos, sin, _FLOAT_DTYPES + (torch.float64,))
    cos, sin = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]  # (T, 1, D)

    def rotate_half(x):  # (T, H, D)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    return (q * cos + rotate_half(q) * sin).contiguous(), (k * cos + rotate_half(k) * sin).contiguous()
# ==== END ROTARY POSITION EMBEDDING ====

# ==== DROPOUT + PROJECTION (dropout_project_ref) ====
DROPOUT_PROJECT_MAX_RANK = 128  # the kernels hold one [rows, rank] accumulator per program: LoRA ranks are 8-64


def _check_dropout_project_args(x, weight, dropout_p, dtypes=_FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dtype not in dtypes or weight.dtype not in dtypes:
        raise TypeError(f"x and weight must be one of {dtypes}, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected x [..., K] and weight [R, K], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] > DROPOUT_PROJECT_MAX_RANK:
        raise ValueError(f"dropout_project supports a weight of up to {DROPOUT_PROJECT_MAX_RANK} rows (a LoRA rank), "
                         f"got {weight.shape[0]}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    check_dropout_p(dropout_p)


def dropout_project_ref(x, weight, dropout_p=0.0, seed=None, *, _keep=None):
    """PyTorch twin of :func:`llm2vec_fast.kernels.dropout_project`: ``dropout(x.to(w.dtype)) @ weight.T``, the
    dropout drawn from a torch generator seeded with ``seed`` (same distribution, not the same bits); the private
    ``_keep`` (bool, x's shape, True = kept, e.g. from ``lora_project.keep_mask``) replaces the draw so that a test
    compares against the kernels' exact mask. Differentiable through autograd."""
    _check_dropout_project_args(x, weight, dropout_p, _FLOAT_DTYPES + (torch.float64,))
    check_seed(seed)
    xin = x.to(weight.dtype)
    if dropout_p > 0:
        if _keep is None:
            seed = new_seed() if seed is None else seed  # as the kernel: torch's generator decides
            gen = torch.Generator(device=x.device).manual_seed(int(seed) % (1 << 63))
            _keep = torch.rand(x.shape, generator=gen, device=x.device) >= dropout_p
        xin = xin * _keep.reshape(x.shape).to(xin.dtype) / (1.0 - dropout_p)
    return xin @ weight.t()
# ==== END DROPOUT + PROJECTION ====
