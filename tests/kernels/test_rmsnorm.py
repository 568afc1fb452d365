"""rms_norm (Triton, interpreter on CPU) against rms_norm_ref, and the twin against Hugging Face's LlamaRMSNorm."""
import functools

import llm2vec_fast.kernels.rmsnorm as rms_mod
import pytest
import torch
from llm2vec_fast.kernels import rms_norm
from llm2vec_fast.kernels.reference import rms_norm_ref

from .helpers import check_against_twin, compile_for_hopper, poison_empty

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

# odd sizes: a single feature, masked tails (80, 96, 576 = SmolLM2's hidden size), 3-D inputs, a single row
SHAPES = [(1, 1), (7, 1), (1, 80), (7, 96), (130, 80), (7, 576), (130, 576), (2, 5, 96), (2, 5, 1)]


def _sid(shape):
    return "x".join(map(str, shape))


def _inputs(shape, dtype, wdtype=None, seed=0, device="cpu"):
    """x with rows of very different scales (1e-3 .. 10, where eps matters and where it does not) and one zero row."""
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, generator=g)
    rows = x.view(-1, D)
    rows *= torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0]).repeat(rows.shape[0] // 5 + 1)[: rows.shape[0], None]
    if rows.shape[0] > 2:
        rows[2] = 0.0
    w = 1.0 + 0.5 * torch.randn(D, generator=g)  # trained RMSNorm weights sit around 1
    return x.to(dtype).to(device), w.to(wdtype or dtype).to(device)


def _leaf(t, dtype=None, grad=True):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(grad)


def _assert_rows_close(ours, ref, rtol=1e-5, atol=1e-6):
    """fp32 closeness relative to each row's scale: dx of a row with x ~ 1e-3 is ~1e3 and cancels to small values,
    where fp32 rounding of the large terms (the twin's too) leaves absolute errors of ~1e-7 of the row's maximum."""
    D = ref.shape[-1]
    a, b = ours.detach().reshape(-1, D).double(), ref.detach().reshape(-1, D).double()
    tol = rtol * b.abs().amax(-1, keepdim=True) + atol
    bad = (a - b).abs() > tol
    assert ours.shape == ref.shape and not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off, worst {((a - b).abs() / tol).max().item():.2f}x tolerance")


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled torch.empty / empty_like in the kernel module, so an unwritten row or partial sum fails."""
    poison_empty(monkeypatch)


def test_reference_is_hf_llama_rmsnorm():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, w = _inputs((3, 7, 96), dtype, seed=4)
        hf = modeling.LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(w)
            assert torch.equal(rms_norm_ref(x, w, eps=1e-5), hf(x)), dtype


def test_reference_is_hf_gemma_rmsnorm():
    """unit_offset=True is Gemma's norm (scale 1 + weight in fp32, one rounding), bit for bit, Gemma 1 and 3."""
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    for cls in (gemma.GemmaRMSNorm, gemma3.Gemma3RMSNorm):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x, w = _inputs((9, 96), dtype, seed=4)
            hf = cls(96, eps=1e-5).to(dtype)
            with torch.no_grad():
                hf.weight.copy_(w)
                assert torch.equal(rms_norm_ref(x, w, eps=1e-5, unit_offset=True), hf(x)), (cls, dtype)
    # and it is not Llama's
    x, w = _inputs((9, 96), torch.float32, seed=4)
    assert not torch.allclose(rms_norm_ref(x, w, unit_offset=True), rms_norm_ref(x, w))


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_forward_backward_fp32(shape, eps, unit_offset, poisoned):
    x, w = _inputs(shape, torch.float32)
    x1, w1, x2, w2 = _leaf(x), _leaf(w), _leaf(x), _leaf(w)
    out = rms_norm(x1, w1, eps, unit_offset=unit_offset)
    ref = rms_norm_ref(x2, w2, eps, unit_offset=unit_offset)
    assert out.shape == shape and out.dtype == torch.float32
    assert not out.isnan().any()
    _assert_rows_close(out, ref)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out.backward(dy)
    ref.backward(dy)
    assert not x1.grad.isnan().any() and not w1.grad.isnan().any()
    _assert_rows_close(x1.grad, x2.grad)
    _assert_rows_close(w1.grad, w2.grad)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(130, 576), (7, 80), (2, 5, 96)], ids=_sid)
def test_fp16_two_x_rule(shape, unit_offset):
    x, w = _inputs(shape, torch.float16, seed=2)
    op, twin = (functools.partial(f, unit_offset=unit_offset) for f in (rms_norm, rms_norm_ref))
    (x1, w1), _, _ = check_against_twin(op, twin, [x, w], seed=3)
    assert x1.grad.dtype == w1.grad.dtype == torch.float16


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["x16-w32", "x32-w16"])
def test_mixed_dtypes_promote(xdtype, wdtype, poisoned):
    x, w = _inputs((7, 96), xdtype, wdtype, seed=5)
    assert rms_norm(x, w).dtype == torch.float32
    (x1, w1), (_, wlp), _ = check_against_twin(rms_norm, rms_norm_ref, [x, w], seed=6)
    assert x1.grad.dtype == xdtype and w1.grad.dtype == wdtype
    if xdtype == torch.float16:
        # an fp32 d weight shows the rounding: both sum dy * x_hat with x_hat rounded to fp16, as the forward used it
        _assert_rows_close(w1.grad, wlp.grad)


def test_fp16_rounds_x_hat_before_the_weight():
    # HF's rounding order: the fp32 weight multiplies x_hat rounded to fp16, not the fp32 x_hat
    x, w = _inputs((7, 80), torch.float16, torch.float32, seed=7)
    out = rms_norm(x, w)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    unrounded = w * h
    assert (out - unrounded).abs().max() > 1e-5  # the two orders differ visibly ...
    torch.testing.assert_close(out, rms_norm_ref(x, w), rtol=1e-6, atol=1e-7)  # ... and ours is HF's


@pytest.mark.parametrize("which", ["x", "weight"])
def test_one_input_without_grad(which, poisoned):
    x, w = _inputs((130, 80), torch.float32, seed=8)
    x1, w1 = _leaf(x, grad=which == "x"), _leaf(w, grad=which == "weight")
    x2, w2 = _leaf(x, grad=which == "x"), _leaf(w, grad=which == "weight")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    rms_norm(x1, w1).backward(dy)
    rms_norm_ref(x2, w2).backward(dy)
    if which == "x":
        assert w1.grad is None
        _assert_rows_close(x1.grad, x2.grad)
    else:
        assert x1.grad is None
        _assert_rows_close(w1.grad, w2.grad)


def test_no_grad_mode():
    x, w = _inputs((7, 96), torch.float32)
    with torch.no_grad():
        out = rms_norm(_leaf(x), _leaf(w))
    assert not out.requires_grad
    torch.testing.assert_close(out, rms_norm_ref(x, w))


NONCONTIG = {  # base buffer shape and the view of it that is normalised
    "strided-rows": ((130, 100), lambda b: b[:, 7:87]),  # a slice of a wider buffer: read in place
    "strided-rows-3d": ((2, 65, 100), lambda b: b[:, :, 3:83]),
    "transposed": ((80, 130), lambda b: b.t()),  # last dim not contiguous: copied
}


@pytest.mark.parametrize("case", list(NONCONTIG))
def test_non_contiguous_inputs(case, poisoned):
    shape, view = NONCONTIG[case]
    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g)
    w_wide = torch.randn(2 * 80, generator=g)
    b1, b2 = _leaf(base), _leaf(base)
    w1, w2 = _leaf(w_wide), _leaf(w_wide)
    out = rms_norm(view(b1), w1[::2])  # a strided weight too
    ref = rms_norm_ref(view(b2), w2[::2])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(tuple(reversed(out.shape)), generator=g).permute(*reversed(range(out.dim())))  # strided dy
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["strided-rows", "strided-rows-3d"])
def test_strided_rows_read_in_place(case):
    # rows of a wider buffer are read through their row stride, not copied
    shape, view = NONCONTIG[case]
    x = view(torch.randn(shape))
    w = torch.randn(80)
    y, _, x2 = rms_mod.rms_norm_fwd(x, w, 1e-6)
    assert x2.data_ptr() == x.data_ptr() and x2.stride() == (100, 1)
    torch.testing.assert_close(y, rms_norm_ref(x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 96), (2, 0, 80), (3, 0)], ids=_sid)
def test_empty_input(shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    out = rms_norm(x, w)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape
    assert w.grad.shape == (shape[-1],) and (w.grad == 0).all()


def test_dweight_is_deterministic():
    x, w = _inputs((130, 576), torch.float32, seed=10)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    grads = []
    for _ in range(2):
        x1, w1 = _leaf(x), _leaf(w)
        rms_norm(x1, w1).backward(dy)
        grads.append((x1.grad, w1.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_several_backward_programs():
    # the d-weight partial sums are split over programs here: each must cover its own rows, none twice
    BR, _, _ = rms_mod._blocks(576)
    tiles = -(-130 // BR)
    assert rms_mod._bwd_programs(torch.device("cpu"), tiles) > 1


def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_errors():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    for fn in (rms_norm, rms_norm_ref):
        _err(lambda f=fn: f(x.long(), w), TypeError, r"x must be one of .*torch.int64")
        _err(lambda f=fn: f(x, w.int()), TypeError, r"weight must be one of .*torch.int32")
        _err(lambda f=fn: f(x.tolist(), w), TypeError, "x must be a torch.Tensor, got list")
        _err(lambda f=fn: f(x, None), TypeError, "weight must be a torch.Tensor, got NoneType")
        _err(lambda f=fn: f(x, torch.randn(7)), ValueError, r"weight must have shape \(8,\).*\(4, 8\).*got \(7,\)")
        _err(lambda f=fn: f(x, torch.randn(1, 8)), ValueError, r"shape \(8,\).*got \(1, 8\)")
        _err(lambda f=fn: f(torch.tensor(1.0), torch.randn(1)), ValueError, "0-d")
        _err(lambda f=fn: f(x, w, 0.0), ValueError, "eps must be a positive finite number, got 0.0")
        _err(lambda f=fn: f(x, w, -1e-6), ValueError, "got -1e-06")
        _err(lambda f=fn: f(x, w, float("inf")), ValueError, "got inf")
        _err(lambda f=fn: f(x, w, float("nan")), ValueError, "got nan")
        _err(lambda f=fn: f(x, w, "1e-6"), TypeError, "eps must be a real number, got str")
    _err(lambda: rms_norm(torch.randn(1, 65537), torch.randn(65537)), ValueError, r"up to 65536.*D=65537")


@pytest.mark.gpu
def test_device_mismatch_gpu():
    _err(lambda: rms_norm(torch.randn(4, 8, device="cuda"), torch.randn(8)), ValueError, "cpu.*cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("wdtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,D", [(4096, 2048), (4096, 576), (1000, 4096), (333, 8192), (64, 65536)],
                         ids=lambda v: str(v))
def test_gpu_big(N, D, dtype, wdtype, unit_offset):
    x, w = _inputs((N, D), dtype, dtype if wdtype == "same" else torch.float32, device="cuda")
    op, twin = (functools.partial(f, unit_offset=unit_offset) for f in (rms_norm, rms_norm_ref))
    (x1, w1), _, dy = check_against_twin(op, twin, [x, w], exact=torch.float32)
    # d weight: deterministic on the GPU too (no atomics)
    x3, w3 = _leaf(x), _leaf(w)
    op(x3, w3).backward(dy)
    assert torch.equal(w3.grad, w1.grad) and torch.equal(x3.grad, x1.grad)


@pytest.mark.gpu
def test_gpu_fp32_tight():
    x, w = _inputs((4096, 2048), torch.float32, device="cuda")
    x1, w1, x2, w2 = _leaf(x), _leaf(w), _leaf(x), _leaf(w)
    out, ref = rms_norm(x1, w1), rms_norm_ref(x2, w2)
    _assert_rows_close(out, ref)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    _assert_rows_close(x1.grad, x2.grad)
    _assert_rows_close(w1.grad, w2.grad, rtol=1e-4)  # a sum over 4096 rows in a different order


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for Hopper (sm_90) in a subprocess without TRITON_INTERPRET: both kernels, bf16 pointers.
# ---------------------------------------------------------------------------------------------------------------------
_AOT = r"""
import llm2vec_fast.kernels.rmsnorm as R

fp32_ptrs = {"rstd"}
for name, consts in (("_rms_norm_fwd_kernel", dict(BR=2, BD=2048, UNIT_OFFSET=False)),
                     ("_rms_norm_bwd_kernel", dict(BR=2, BD=2048, HAS_DX=True, HAS_DW=True, UNIT_OFFSET=False)),
                     ("_rms_norm_fwd_kernel", dict(BR=32, BD=128, UNIT_OFFSET=True)),
                     ("_rms_norm_bwd_kernel", dict(BR=32, BD=128, HAS_DX=True, HAS_DW=True, UNIT_OFFSET=True)),
                     ("_rms_norm_bwd_kernel", dict(BR=32, BD=128, HAS_DX=True, HAS_DW=False, UNIT_OFFSET=False))):
    fn = getattr(R, name)
    ptrs = {"x", "w", "y", "dy", "dx", "rstd", "dw"}
    sig = {n: ("constexpr" if n in consts else ("*fp32" if n in fp32_ptrs or n == "dw" else "*bf16") if n in ptrs
               else "fp32" if n == "eps" else "i32") for n in fn.arg_names}
    attrs = aligned(fn, sig, also=("D",))
    k = sm90(fn, sig, consts, attrs, num_warps=8)
    assert ".version" in k.asm["ptx"]
    print("OK", name, consts)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    compile_for_hopper(_AOT, tmp_path, expected_ok=5)
