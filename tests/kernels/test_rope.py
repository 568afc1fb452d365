"""rope (Triton, interpreter on CPU) against rope_ref, and both against Hugging Face's Llama apply_rotary_pos_emb."""
import importlib

import pytest
import torch
from llm2vec_fast.kernels import rope
from llm2vec_fast.kernels.reference import rope_ref

from .helpers import check_against_twin, compile_for_hopper, poison_empty

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

rope_mod = importlib.import_module("llm2vec_fast.kernels.rotary")

# MHA, MQA and GQA 3:1; head dims that are a power of two and one that is not (masked half-width block)
HEADS = [(4, 4), (4, 1), (6, 2)]
TS = [1, 7, 97]
DS = [32, 80, 128]


def _hid(h):
    return f"HQ{h[0]}-HKV{h[1]}"


def _hf_cos_sin(positions, D, base=10000.0):
    """HF's default rotary tables for the given positions: cos / sin of cat(freqs, freqs), fp32 [T, D]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _inputs(T, HQ, HKV, D, dtype, cos_dtype=None, seed=0, tables="hf", device="cpu"):
    """q, k and cos / sin for T packed tokens: HF's tables at the positions of packed sequences of lengths 1, 3, 5,
    ... (restarting at 0), or unstructured random tables whose halves differ (c1 != c2, s1 != s2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HQ, D, generator=g)
    k = torch.randn(T, HKV, D, generator=g)
    if tables == "hf":
        lengths, n = [], 0
        while n < T:
            lengths.append(min(2 * len(lengths) + 1, T - n))
            n += lengths[-1]
        positions = torch.cat([torch.arange(L) for L in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        cos, sin = _hf_cos_sin(positions * 37, D)  # spread the positions over many periods
    else:
        cos, sin = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    cd = cos_dtype or dtype
    return q.to(dtype).to(device), k.to(dtype).to(device), cos.to(cd).to(device), sin.to(cd).to(device)


def _flat(f, cos, sin):
    """f(q, k) for check_against_twin: one output (q_out and k_out flattened and concatenated), so that the
    gradients of both q and k are checked; cos / sin go to the float64 twin in float64 (exact from fp32 or fp16)."""

    def op(q, k):
        c, s = (t.to(q.dtype) if q.dtype == torch.float64 else t for t in (cos, sin))
        q_out, k_out = f(q, k, c, s)
        return torch.cat([q_out.reshape(-1), k_out.reshape(-1)])

    return op


def _check(q, k, cos, sin, atol=1e-5, seed=1):
    """Forward and both gradients against the twin (2x / 3x rules); returns our (q, k) leaves."""
    (q1, k1), _, _ = check_against_twin(_flat(rope, cos, sin), _flat(rope_ref, cos, sin), [q, k], seed=seed,
                                        atol=atol)
    assert not q1.grad.isnan().any() and not k1.grad.isnan().any()
    return q1, k1


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled torch.empty / empty_like in the kernel module, so an element the kernel forgets to write fails."""
    poison_empty(monkeypatch)


# ---------------------------------------------------------------------------------------------------------------------
# First, because a missing mask makes the interpreter write past an output's end (and later tests abort or segfault):
# here the outputs and inputs have slack after them, so such a bug fails an assertion instead.
# ---------------------------------------------------------------------------------------------------------------------
def test_writes_stay_in_bounds(monkeypatch):
    # every output (forward and backward) is the start of a NaN-filled buffer with slack after it: the kernel must
    # write all of it and nothing past it, with masked tokens (T = 7 < BT), heads (5 and 3 < BH) and features
    # (D = 80: half-width 40 < BD = 64). The inputs have slack too, so that a missing mask reads memory that exists.
    slack = 8192
    outs = []
    real_empty = torch.empty

    def guarded_empty(shape, dtype=None, device=None, **kw):
        n = int(torch.Size(shape).numel())
        buf = real_empty(n + slack, dtype=dtype, device=device).fill_(float("nan"))
        outs.append((buf, n))
        return buf[:n].view(shape)

    def padded(t):
        buf = torch.randn(t.numel() + slack, generator=torch.Generator().manual_seed(t.numel()), dtype=t.dtype)
        return buf[: t.numel()].view(t.shape).copy_(t)

    q, k, cos, sin = (padded(t) for t in _inputs(7, 5, 3, 80, torch.float32, seed=15, tables="random"))
    q1, k1 = _leaf(q), _leaf(k)
    dys = [padded(torch.randn(t.shape)) for t in (q, k)]
    monkeypatch.setattr(torch, "empty", guarded_empty)
    q_out, k_out = rope(q1, k1, cos, sin)
    torch.autograd.backward([q_out, k_out], dys)
    monkeypatch.undo()
    assert len(outs) == 4  # q_out, k_out, dq, dk
    for buf, n in outs:
        assert not buf[:n].isnan().any() and buf[n:].isnan().all()
    q2, k2 = _leaf(q), _leaf(k)
    refs = rope_ref(q2, k2, cos, sin)
    torch.autograd.backward(list(refs), dys)
    for a, b in zip((q_out, k_out, q1.grad, k1.grad), (*refs, q2.grad, k2.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face parity: the twin is HF's formula bit for bit, the kernel matches it on HF's own tables.
# ---------------------------------------------------------------------------------------------------------------------
def _hf_rotary(T, dtype, HQ=4, HKV=2, D=64, seed=3):
    """q, k [T, H, D] as transposed views of HF's [H, T, D] layout, and cos / sin [1, T, D] from a real
    LlamaRotaryEmbedding; returns HF's own apply_rotary_pos_emb result transposed back to [T, H, D]."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = modeling.LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                                  num_hidden_layers=1, intermediate_size=64, vocab_size=32,
                                  max_position_embeddings=4096)
    g = torch.Generator().manual_seed(seed)
    q_hf = torch.randn(1, HQ, T, D, generator=g).to(dtype)  # (B, H, T, D)
    k_hf = torch.randn(1, HKV, T, D, generator=g).to(dtype)
    position_ids = (torch.arange(T) * 53)[None]  # (1, T): far positions, many periods of the fast frequencies
    cos, sin = modeling.LlamaRotaryEmbedding(config)(q_hf, position_ids)  # (1, T, D) in q's dtype
    q_ref, k_ref = modeling.apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    q, k, q_ref, k_ref = (t[0].transpose(0, 1) for t in (q_hf, k_hf, q_ref, k_ref))
    return q, k, cos, sin, q_ref, k_ref


def test_reference_is_hf_apply_rotary_pos_emb():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, cos, sin, q_hf, k_hf = _hf_rotary(13, dtype)
        q_out, k_out = rope_ref(q, k, cos, sin)
        assert torch.equal(q_out, q_hf) and torch.equal(k_out, k_hf), dtype
        assert q_out.is_contiguous() and k_out.is_contiguous()


def test_kernel_matches_hf_llama_rotary_fp32(poisoned):
    # HF's [1, H, T, D] layout transposed to ours (read in place), cos / sin [1, T, D] from LlamaRotaryEmbedding
    q, k, cos, sin, q_hf, k_hf = _hf_rotary(13, torch.float32)
    assert not q.is_contiguous() and cos.shape == (1, 13, 64)
    q_out, k_out = rope(q, k, cos, sin)
    assert q_out.shape == (13, 4, 64) and k_out.shape == (13, 2, 64) and q_out.is_contiguous()
    torch.testing.assert_close(q_out, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_hf, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Forward and gradients against the twin.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", DS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("heads", HEADS, ids=_hid)
@pytest.mark.parametrize("T", TS, ids=lambda t: f"T{t}")
def test_forward_backward_fp32(T, heads, D, poisoned):
    q, k, cos, sin = _inputs(T, *heads, D, torch.float32)
    q_out, k_out = rope(q, k, cos, sin)
    assert q_out.shape == (T, heads[0], D) and k_out.shape == (T, heads[1], D)
    assert q_out.dtype == k_out.dtype == torch.float32 and q_out.is_contiguous() and k_out.is_contiguous()
    assert not q_out.isnan().any() and not k_out.isnan().any()
    _check(q, k, cos, sin, atol=1e-6)


@pytest.mark.parametrize("cos_dtype", ["same", "fp32"])
@pytest.mark.parametrize("T,heads,D", [pytest.param(T, h, D, id=f"T{T}-{_hid(h)}-D{D}")
                                       for T, h, D in [(97, (6, 2), 128), (7, (4, 1), 80), (1, (4, 4), 32)]])
def test_fp16_two_x_rule(T, heads, D, cos_dtype, poisoned):
    q, k, cos, sin = _inputs(T, *heads, D, torch.float16, None if cos_dtype == "same" else torch.float32, seed=2)
    q1, k1 = _check(q, k, cos, sin, seed=3)
    assert q1.grad.dtype == k1.grad.dtype == torch.float16
    assert rope(q, k, cos, sin)[0].dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [80, 128], ids=lambda d: f"D{d}")
def test_random_tables_halves_differ(D, dtype, poisoned):
    # cos / sin with c1 != c2 and s1 != s2 (not HF's cat(freqs, freqs)): forward and backward use each half
    # where it belongs, so a kernel that reads c1 for c2 (or transposes the rotation wrongly) fails here
    q, k, cos, sin = _inputs(23, 6, 2, D, dtype, seed=4, tables="random")
    assert not torch.equal(cos[:, : D // 2], cos[:, D // 2 :]) and not torch.equal(sin[:, : D // 2], sin[:, D // 2 :])
    _check(q, k, cos, sin, atol=1e-6 if dtype == torch.float32 else 1e-5, seed=5)


def test_fp16_rounds_once():
    # fp32 math from the loaded values, one rounding: the fp32 result rounded to fp16 (HF rounds each product)
    q, k, cos, sin = _inputs(97, 4, 2, 80, torch.float16, seed=6)
    once = [o.half() for o in rope_ref(q.float(), k.float(), cos.float(), sin.float())]
    ours = rope(q, k, cos, sin)
    twin = rope_ref(q, k, cos, sin)
    for a, b, c in zip(ours, once, twin, strict=True):
        assert torch.equal(a, b)
        assert (c != b).any()  # the twin's two roundings do show


def test_head_blocks_loop(monkeypatch, poisoned):
    # tiny tiles: BH = 2 heads per step (5 and 3 heads: a partial last block) and one token per program at D = 32,
    # one head per step at D = 80; the GPU takes this path for many heads (e.g. 64 heads of D = 128)
    monkeypatch.setattr(rope_mod, "_TILE", 32)
    assert rope_mod._blocks(32, 5, 3) == (1, 16, 2, 2) and rope_mod._blocks(80, 5, 3) == (1, 64, 1, 1)
    for D in (32, 80):
        q, k, cos, sin = _inputs(7, 5, 3, D, torch.float32, seed=7, tables="random")
        _check(q, k, cos, sin, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts: views read in place, cos / sin variants.
# ---------------------------------------------------------------------------------------------------------------------
T_NC, HQ_NC, HKV_NC, D_NC = 13, 4, 2, 80


def _fused_qkv(base):
    # base [T, (Hq + 2 Hkv) * D]: q and k are slices of a fused qkv projection's output (v unused)
    q = base[:, : HQ_NC * D_NC].view(T_NC, HQ_NC, D_NC)
    k = base[:, HQ_NC * D_NC : (HQ_NC + HKV_NC) * D_NC].view(T_NC, HKV_NC, D_NC)
    return q, k


def _transposed(base):
    # base [Hq + Hkv, T, D]: HF's head-major layout transposed to token-major (head stride T * D, token stride D)
    return base[:HQ_NC].transpose(0, 1), base[HQ_NC:].transpose(0, 1)


def _padded_heads(base):
    # base [T, Hq + Hkv, D + 16]: heads padded to D + 16 (head stride != D, token stride != H * D)
    return base[:, :HQ_NC, :D_NC], base[:, HQ_NC:, :D_NC]


NONCONTIG = {
    "fused-qkv": ((T_NC, (HQ_NC + 2 * HKV_NC) * D_NC), _fused_qkv),
    "transposed": ((HQ_NC + HKV_NC, T_NC, D_NC), _transposed),
    "padded-heads": ((T_NC, HQ_NC + HKV_NC, D_NC + 16), _padded_heads),
}


@pytest.mark.parametrize("case", list(NONCONTIG))
def test_non_contiguous_inputs(case, poisoned):
    shape, view = NONCONTIG[case]
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g)
    _, _, cos, sin = _inputs(T_NC, 1, 1, D_NC, torch.float32, seed=9, tables="random")
    b1, b2 = _leaf(base), _leaf(base)
    (q1, k1), (q2, k2) = view(b1), view(b2)
    assert not q1.is_contiguous() and not k1.is_contiguous() and q1.stride(-1) == 1
    outs, refs = rope(q1, k1, cos, sin), rope_ref(q2, k2, cos, sin)
    for o, r in zip(outs, refs, strict=True):
        assert o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    # strided upstream gradients too: transposes of [H, T, D] tensors
    dys = [torch.randn(o.shape[1], o.shape[0], o.shape[2], generator=g).transpose(0, 1) for o in outs]
    torch.autograd.backward(outs, dys)
    torch.autograd.backward(refs, dys)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-6, atol=1e-6)


def test_inputs_read_in_place(monkeypatch):
    # a view with a contiguous last dim goes to the kernel as it is: no copy of q or k
    seen = []
    real = rope_mod._launch
    monkeypatch.setattr(rope_mod, "_launch", lambda q, k, *a: seen.append((q, k)) or real(q, k, *a))
    base = torch.randn(T_NC, (HQ_NC + 2 * HKV_NC) * D_NC)
    q, k = _fused_qkv(base)
    _, _, cos, sin = _inputs(T_NC, 1, 1, D_NC, torch.float32)
    rope(q, k, cos, sin)
    assert seen[0][0].data_ptr() == base.data_ptr() and seen[0][1].data_ptr() == k.data_ptr()
    assert seen[0][0].stride() == q.stride()


def test_cos_sin_variants(poisoned):
    q, k, cos, sin = _inputs(7, 4, 2, 80, torch.float32, seed=10)
    expected = rope_ref(q, k, cos, sin)
    # [1, T, D] as LlamaRotaryEmbedding returns it; strided rows of a wider table; the last dim not contiguous
    wide_c, wide_s = torch.zeros(7, 96), torch.zeros(7, 96)
    wide_c[:, 3:83], wide_s[:, 3:83] = cos, sin
    for c, s in ((cos[None], sin[None]), (wide_c[:, 3:83], wide_s[:, 3:83]), (cos.t().contiguous().t(), sin)):
        for o, e in zip(rope(q, k, c, s), expected, strict=True):
            torch.testing.assert_close(o, e, rtol=0, atol=0)
    # one row for every token (stride 0): every token rotated by the same angle
    c, s = cos[3:4].expand(7, 80), sin[3:4].expand(7, 80)
    for o, e in zip(rope(q, k, c, s), rope_ref(q, k, c.contiguous(), s.contiguous()), strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("D", [2, 6], ids=lambda d: f"D{d}")
def test_tiny_head_dims(D, poisoned):
    q, k, cos, sin = _inputs(7, 3, 1, D, torch.float32, seed=11, tables="random")
    _check(q, k, cos, sin, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd corners.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["q", "k"])
def test_one_input_without_grad(which, poisoned):
    q, k, cos, sin = _inputs(7, 4, 2, 80, torch.float32, seed=12, tables="random")
    leaves = [(_leaf(q, which == "q"), _leaf(k, which == "k")) for _ in range(2)]
    g = torch.Generator().manual_seed(13)
    dys = [torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)]
    i = 0 if which == "q" else 1
    for f, (qq, kk) in zip((rope, rope_ref), leaves, strict=True):
        # ours: both outputs need grad (an autograd.Function's outputs all do) and both get one; the twin's do not
        pairs = [(o, dy) for o, dy in zip(f(qq, kk, cos, sin), dys, strict=True) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [dy for _, dy in pairs])
    assert all(pair[1 - i].grad is None for pair in leaves)
    torch.testing.assert_close(leaves[0][i].grad, leaves[1][i].grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("used", ["q_out", "k_out"])
def test_one_output_unused(used, poisoned):
    # the unused output's input gets no gradient, as with HF's code (q_out and k_out are separate graphs there)
    q, k, cos, sin = _inputs(7, 4, 2, 80, torch.float32, seed=14, tables="random")
    leaves = [(_leaf(q), _leaf(k)) for _ in range(2)]
    for f, (qq, kk) in zip((rope, rope_ref), leaves, strict=True):
        out = f(qq, kk, cos, sin)[0 if used == "q_out" else 1]
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    i = 0 if used == "q_out" else 1
    torch.testing.assert_close(leaves[0][i].grad, leaves[1][i].grad, rtol=1e-6, atol=1e-6)
    assert leaves[0][1 - i].grad is None and leaves[1][1 - i].grad is None


def test_no_grad_mode():
    q, k, cos, sin = _inputs(7, 4, 2, 80, torch.float32)
    with torch.no_grad():
        outs = rope(_leaf(q), _leaf(k), cos, sin)
    assert not any(o.requires_grad for o in outs)
    for o, e in zip(outs, rope_ref(q, k, cos, sin), strict=True):
        torch.testing.assert_close(o, e)


def test_cos_sin_that_require_grad_get_the_twins_gradient():
    # rotary buffers never require grad (the kernel path); a learned table does, and then gets its gradient
    q, k, cos, sin = _inputs(7, 4, 2, 80, torch.float32)
    grads = []
    for fn in (rope, rope_ref):
        c, s, q1 = _leaf(cos), _leaf(sin), _leaf(q)
        q_out, k_out = fn(q1, k, c, s)
        (q_out.sum() + 2 * k_out.sum()).backward()
        grads.append((c.grad, s.grad, q1.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_empty_input(monkeypatch):
    # T = 0: empty outputs and gradients, nothing launched; cos / sin [0, D] or [1, 0, D]
    launches = []
    fake = type("FakeKernel", (), {"__getitem__": lambda self, grid: launches.append(grid) or (lambda *a, **k: None)})
    monkeypatch.setattr(rope_mod, "_rope_kernel", fake())
    q = torch.randn(0, 4, 32, requires_grad=True)
    k = torch.randn(0, 2, 32, requires_grad=True)
    for cos in (torch.randn(0, 32), torch.randn(1, 0, 32)):
        q_out, k_out = rope(q, k, cos, cos.clone())
        assert q_out.shape == (0, 4, 32) and k_out.shape == (0, 2, 32)
        (q_out.sum() + k_out.sum()).backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert launches == []


def test_no_query_heads(poisoned):
    # Hq = 0 (only keys to rotate): the q loop runs zero times, k is still right
    _, k, cos, sin = _inputs(5, 1, 3, 32, torch.float32, tables="random")
    q = torch.randn(5, 0, 32)
    q_out, k_out = rope(q, k, cos, sin)
    assert q_out.shape == (5, 0, 32)
    torch.testing.assert_close(k_out, rope_ref(q, k, cos, sin)[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------------------
def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_errors():
    q, k, cos, sin = _inputs(7, 4, 2, 32, torch.float32)
    for fn in (rope, rope_ref):
        _err(lambda f=fn: f(q.tolist(), k, cos, sin), TypeError, "q must be a torch.Tensor, got list")
        _err(lambda f=fn: f(q, k, cos, 1.0), TypeError, "sin must be a torch.Tensor, got float")
        _err(lambda f=fn: f(q.long(), k.long(), cos, sin), TypeError, r"q must be one of .*got torch.int64")
        _err(lambda f=fn: f(q, k.half(), cos, sin), TypeError, "k must have q's dtype, got q torch.float32 and k "
             "torch.float16")
        _err(lambda f=fn: f(q, k, cos.half(), sin), TypeError, "cos must be torch.float32, got torch.float16")
        _err(lambda f=fn: f(q.half(), k.half(), cos, sin.bfloat16()), TypeError,
             r"sin must be q's dtype \(torch.float16\) or torch.float32, got torch.bfloat16")
        _err(lambda f=fn: f(q[:, 0], k, cos, sin), ValueError, r"q must be a 3-D packed tensor \[T, H, D\], got "
             r"shape \(7, 32\)")
        _err(lambda f=fn: f(q, k[None], cos, sin), ValueError, r"k must be a 3-D .*got shape \(1, 7, 2, 32\)")
        _err(lambda f=fn: f(q, k, cos, sin[:6]), ValueError, r"same shape, got cos \(7, 32\) and sin \(6, 32\)")
        _err(lambda f=fn: f(q, k, cos.expand(2, 7, 32), sin.expand(2, 7, 32)), ValueError,
             r"\[T, D\] or \[1, T, D\], got shape \(2, 7, 32\)")
        _err(lambda f=fn: f(q, k, cos.view(-1), sin.view(-1)), ValueError, r"got shape \(224,\)")
        _err(lambda f=fn: f(q, k[:6], cos, sin), ValueError, r"number of tokens T .*q \(7, 4, 32\), k \(6, 2, 32\) "
             r"and cos \(7, 32\)")
        _err(lambda f=fn: f(q[:6], k[:6], cos, sin), ValueError, r"number of tokens T .*cos \(7, 32\)")
        _err(lambda f=fn: f(q, k[..., :16], cos, sin), ValueError, r"head dim D .*k \(7, 2, 16\)")
        _err(lambda f=fn: f(q[..., :30], k[..., :30], cos, sin), ValueError, r"head dim D .*cos \(7, 32\)")
        _err(lambda f=fn: f(q[..., :31], k[..., :31], cos[:, :31], sin[:, :31]), ValueError,
             "must be even and positive .*got D=31")
        _err(lambda f=fn: f(q[..., :0], k[..., :0], cos[:, :0], sin[:, :0]), ValueError, "got D=0")
    # the kernel only: the last dim must be contiguous, D within one tile
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    _err(lambda: rope(qt, k, cos, sin), ValueError, r"q must have a contiguous last dim.*got strides \(128, 1, 4\)")
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    _err(lambda: rope(q, kt, cos, sin), ValueError, r"k must have a contiguous last dim.*got strides \(64, 1, 2\)")
    big = torch.zeros(1, 1, 4098)
    _err(lambda: rope(big, big, big[0], big[0]), ValueError, "head dim D up to 4096, got D=4098")


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16, realistic sizes, device checks.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_device_mismatch_gpu():
    q, k, cos, sin = _inputs(7, 4, 2, 32, torch.float32)
    _err(lambda: rope(q.cuda(), k.cuda(), cos, sin.cuda()), ValueError, "cos is on cpu but q is on cuda")
    _err(lambda: rope(q.cuda(), k, cos.cuda(), sin.cuda()), ValueError, "k is on cpu but q is on cuda")


# every head dim once, each head layout and T = 1 on some: each case compiles its own kernels, and the GPU check runs
# under a time budget
_GPU_CASES = [(130, (4, 4), 32), (1, (4, 1), 64), (130, (6, 2), 80), (130, (4, 1), 96), (130, (4, 4), 128),
              (1, (6, 2), 128), (130, (6, 2), 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("cos_dtype", ["same", "fp32"])
@pytest.mark.parametrize("T,heads,D", _GPU_CASES, ids=[f"T{t}-{_hid(h)}-D{d}" for t, h, d in _GPU_CASES])
def test_gpu_bf16(T, heads, D, cos_dtype):
    q, k, cos, sin = _inputs(T, *heads, D, torch.bfloat16, None if cos_dtype == "same" else torch.float32,
                             device="cuda")
    _check(q, k, cos, sin)
    q, k, cos, sin = _inputs(T, *heads, D, torch.bfloat16, seed=1, tables="random", device="cuda")
    _check(q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("heads", [(32, 8), (64, 8)], ids=_hid)
def test_gpu_big(heads, dtype):
    # a realistic packed batch: 8192 tokens, Llama-3-8B's 32 query / 8 kv heads of D = 128 (and 64 query heads:
    # more than one head block per program), read as views of a fused qkv output
    T, (HQ, HKV), D = 8192, heads, 128
    base = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=dtype)
    q, k = base[:, : HQ * D].view(T, HQ, D), base[:, HQ * D : (HQ + HKV) * D].view(T, HKV, D)
    cos, sin = (t.to("cuda", dtype) for t in _hf_cos_sin(torch.arange(T), D))
    _check(q, k, cos, sin, atol=1e-6 if dtype == torch.float32 else 1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for Hopper (sm_90) in a subprocess without TRITON_INTERPRET: forward and backward, bf16 q / k
# with bf16 and fp32 tables.
# ---------------------------------------------------------------------------------------------------------------------
_AOT = r"""
import importlib
R = importlib.import_module("llm2vec_fast.kernels.rotary")

fn = R._rope_kernel
for bwd, table in ((False, "*bf16"), (True, "*bf16"), (False, "*fp32"), (True, "*fp32")):
    consts = dict(HQ=32, HKV=8, D=128, BT=1, BD=64, BHQ=32, BHK=8, BWD=bwd)
    sig = {n: ("constexpr" if n in consts else (table if n in ("cos", "sin") else "*bf16") if n in
               ("q", "k", "cos", "sin", "q_out", "k_out") else "i32") for n in fn.arg_names}
    attrs = aligned(fn, sig)
    k = sm90(fn, sig, consts, attrs, num_warps=R._NUM_WARPS)
    assert ".version" in k.asm["ptx"]
    print("OK", bwd, table)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    compile_for_hopper(_AOT, tmp_path, expected_ok=4)
