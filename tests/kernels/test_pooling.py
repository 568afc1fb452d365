"""masked_pool (Triton, interpreter on CPU) against masked_pool_ref, and the twin against the original's formulas."""
import pytest
import torch
from llm2vec_fast.kernels import masked_pool
from llm2vec_fast.kernels.reference import POOL_MODES, masked_pool_ref

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

MODES = sorted(POOL_MODES)  # every canonical mode and alias
# lengths with odd sizes, a length-1 segment beside a long one, and a zero-length sequence
LENGTHS = [1, 2, 7, 33, 0, 5]


def _batch(lengths, D, dtype, starts="mixed", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    hidden = torch.randn(T, D, generator=g).to(dtype).to(device)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    if starts is None:
        ps = None
    elif starts == "mixed":
        # empty pooled span (== length), whole-sequence span (0), and instruction prefixes in between
        ps = torch.tensor([(i * 3) % (l + 1) if i % 3 else (l if i % 2 else 0) for i, l in enumerate(lengths)],
                          dtype=torch.int32)
    elif starts == "empty":
        ps = torch.tensor(lengths, dtype=torch.int32)
    return hidden, cu.to(device), (ps.to(device) if ps is not None else None)


def _original_pool(hidden, cu, mode, pool_start):
    """The original llm2vec 0.2.3 get_pooling on a left-padded batch whose instruction tokens are masked out."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    B, L, D = len(lengths), max(lengths), hidden.shape[1]
    padded = torch.zeros(B, L, D, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, l in enumerate(lengths):
        if l:
            padded[i, L - l:] = hidden[cu[i]:cu[i + 1]].double()
            p = int(pool_start[i]) if pool_start is not None else 0
            mask[i, L - l + p:] = 1  # the original's embed_mask: instruction tokens are not pooled
    seq_lengths = mask.sum(-1)
    mode = POOL_MODES[mode]
    out = torch.zeros(B, D, dtype=torch.float64)
    for i, (n, l) in enumerate(zip(seq_lengths.tolist(), lengths, strict=True)):
        if mode == "mean" and n > 0:
            out[i] = padded[i, -n:].mean(0)
        elif mode == "weighted_mean" and n > 0:
            w = torch.zeros(L, dtype=torch.float64)
            w[-n:] = torch.arange(n) + 1
            w /= w.sum()
            out[i] = (padded[i] * w[:, None]).sum(0)
        elif mode == "last_token" and l > 0:
            out[i] = padded[i, -1]
        elif mode == "first_token" and l > 0:
            out[i] = padded[i, L - l]  # where the BOS token of a left-padded row sits
    return out


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_original_formulas(mode):
    hidden, cu, ps = _batch(LENGTHS, 8, torch.float64)
    ours = masked_pool_ref(hidden, cu, mode, ps)
    torch.testing.assert_close(ours, _original_pool(hidden, cu, mode, ps), rtol=1e-12, atol=1e-12)


def _poisoned(monkeypatch):
    """Make every torch.empty in the kernel module NaN-filled, so a row the kernel forgets to write fails."""
    import llm2vec_fast.kernels.pooling as mod

    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(mod.torch, "empty", nan_empty)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "l2"])
@pytest.mark.parametrize("starts", [None, "mixed", "empty"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward_fp32(mode, starts, normalize, monkeypatch):
    D = 40  # not a power of two: masked feature tail
    hidden, cu, ps = _batch(LENGTHS, D, torch.float32, starts=starts)
    _poisoned(monkeypatch)
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    out = masked_pool(h1, cu, mode, ps, normalize)
    ref = masked_pool_ref(h2, cu, mode, ps, normalize)
    assert out.dtype == hidden.dtype and out.shape == (len(LENGTHS), D)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out[LENGTHS.index(0)] == 0).all()  # zero-length sequence → zeros in every mode
    if starts == "empty" and POOL_MODES[mode] in ("mean", "weighted_mean"):
        assert (out == 0).all()
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    assert not h1.grad.isnan().any()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "l2"])
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token", "first_token"])
def test_fp16_two_x_rule(mode, normalize):
    hidden, cu, ps = _batch(LENGTHS, 72, torch.float16, seed=1)
    h = hidden.clone().requires_grad_()
    h32 = hidden.float().requires_grad_()
    hlp = hidden.clone().requires_grad_()
    out = masked_pool(h, cu, mode, ps, normalize)
    ref32 = masked_pool_ref(h32, cu, mode, ps, normalize)
    ref_lp = masked_pool_ref(hlp, cu, mode, ps, normalize)
    assert out.dtype == torch.float16
    err = (out.float() - ref32).abs().max().item()
    tol = 2 * (ref_lp.float() - ref32).abs().max().item() + 1e-5
    assert err <= tol, (err, tol)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).half()
    out.backward(dy)
    ref32.backward(dy.float())
    ref_lp.backward(dy)
    err = (h.grad.float() - h32.grad).abs().max().item()
    tol = 3 * (hlp.grad.float() - h32.grad).abs().max().item() + 1e-5
    assert err <= tol, (err, tol)


def test_strided_rows_and_whole_span():
    # rows of a wider buffer (feature dim contiguous, row stride > D), pool_start all zero = whole sequences
    base = torch.randn(sum(LENGTHS), 50)
    hidden = base[:, 3:43]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    ps = torch.zeros(len(LENGTHS), dtype=torch.int32)
    for mode in ("mean", "weighted_mean"):
        torch.testing.assert_close(masked_pool(hidden, cu, mode, ps), masked_pool_ref(hidden, cu, mode, None))


def test_normalize_gives_unit_rows_and_zero_for_empty():
    hidden, cu, ps = _batch(LENGTHS, 16, torch.float32, starts="mixed", seed=3)
    out = masked_pool(hidden, cu, "mean", ps, normalize=True)
    norms = out.norm(dim=-1)
    lengths = torch.tensor(LENGTHS)
    nonempty = (lengths - ps.long()) > 0
    torch.testing.assert_close(norms[nonempty], torch.ones(int(nonempty.sum())))
    assert (out[~nonempty] == 0).all()


def test_empty_batch():
    hidden = torch.randn(0, 8)
    out = masked_pool(hidden, torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 8)


def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_errors():
    h = torch.randn(10, 4)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    _err(lambda: masked_pool(h, cu, "max"), ValueError, r"'max'.*expected one of")
    _err(lambda: masked_pool(h[None], cu), ValueError, r"2-D.*\(1, 10, 4\)")
    _err(lambda: masked_pool(h.long(), cu), TypeError, "torch.int64")
    _err(lambda: masked_pool(h, cu.long()), TypeError, "int32.*torch.int64")
    _err(lambda: masked_pool(h, torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"start at 0.*= 1")
    _err(lambda: masked_pool(h, torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
         r"non-decreasing.*cu_seqlens\[1\] = 6")
    _err(lambda: masked_pool(h, torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"= 9 .*= 10")
    _err(lambda: masked_pool(h, cu, pool_start=torch.tensor([0], dtype=torch.int32)), ValueError, r"\(2,\).*\(1,\)")
    _err(lambda: masked_pool(h, cu, pool_start=torch.tensor([0, 1])), TypeError, "pool_start.*int64")
    _err(lambda: masked_pool(h, cu, pool_start=torch.tensor([0, -1], dtype=torch.int32)), ValueError,
         r"pool_start\[1\] = -1")
    _err(lambda: masked_pool(h, cu, pool_start=torch.tensor([5, 0], dtype=torch.int32)), ValueError,
         r"pool_start\[0\] = 5 .*length 4")
    for fn in (masked_pool, masked_pool_ref):
        _err(lambda f=fn: f(h, cu, "nope"), ValueError, "nope")


def test_primed_args_are_validated_once_on_the_host(monkeypatch):
    """prime_pool_args validates cu_seqlens / pool_start from host copies; pooling those tensors then reads nothing
    back (on a GPU, a synchronisation per batch), with the same result; an in-place edit or another token count
    makes the call validate the device tensors again."""
    from llm2vec_fast.kernels import prime_pool_args, reference

    hidden, cu, ps = _batch(LENGTHS, 8, torch.float32)
    want = masked_pool(hidden, cu, "mean", ps)
    prime_pool_args(cu, ps, cu.numpy().copy(), ps.numpy().copy())
    checks = []
    real = reference._check_pool_values
    # checks of the caller's int32 tensors (priming checks its int64 host copies)
    monkeypatch.setattr(reference, "_check_pool_values",
                        lambda *a: (checks.append(a) if a[0].dtype == torch.int32 else None) or real(*a))
    for fn in (masked_pool, masked_pool_ref):
        torch.testing.assert_close(fn(hidden, cu, "mean", ps), want, atol=0, rtol=0)
    assert checks == []
    masked_pool(hidden[:43], cu[:-1], "mean", ps[:-1])  # other tensors: validated as usual
    assert len(checks) == 1
    ps[3] = LENGTHS[3] + 1  # in place: the primed copy no longer describes it
    _err(lambda: masked_pool(hidden, cu, "mean", ps), ValueError, r"pool_start\[3\] = 34 .*length 33")
    ps[3] = 0
    prime_pool_args(cu, ps, cu.tolist(), ps.tolist())
    _err(lambda: masked_pool(hidden[:-1], cu, "mean", ps), ValueError, r"= 48 .*= 47")  # not the primed total
    prime_pool_args(cu, None, cu.tolist())
    masked_pool(hidden, cu, "last_token")
    assert len(checks) == 3


def test_inference_mode_primed_args_serve_one_call():
    """Inference tensors have no version counter, so an in-place edit cannot be seen: their primed copies serve the
    next pooling call only, and an edit after it is validated."""
    from llm2vec_fast.kernels import prime_pool_args

    hidden, cu, ps = _batch(LENGTHS, 8, torch.float32)
    with torch.inference_mode():
        cu, ps = cu.clone(), ps.clone()
        prime_pool_args(cu, ps, cu.tolist(), ps.tolist())
        masked_pool(hidden, cu, "mean", ps)
        ps[3] = LENGTHS[3] + 1
        _err(lambda: masked_pool(hidden, cu, "mean", ps), ValueError, r"pool_start\[3\] = 34 .*length 33")


def test_prime_pool_args_raises_what_pooling_raises():
    from llm2vec_fast.kernels import prime_pool_args

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ps = torch.tensor([0, 1], dtype=torch.int32)
    _err(lambda: prime_pool_args(cu, ps, [1, 4, 10], [0, 1]), ValueError, r"start at 0.*= 1")
    _err(lambda: prime_pool_args(cu, ps, [0, 6, 4], [0, 1]), ValueError, r"non-decreasing.*cu_seqlens\[1\] = 6")
    _err(lambda: prime_pool_args(cu, ps, [0, 4, 10], [0, -1]), ValueError, r"pool_start\[1\] = -1")
    _err(lambda: prime_pool_args(cu, ps, [0, 4, 10], [5, 0]), ValueError, r"pool_start\[0\] = 5 .*length 4")
    _err(lambda: prime_pool_args(cu, ps, [0, 10], [0, 1]), ValueError, "cu_host has 2 entries, cu_seqlens 3")
    _err(lambda: prime_pool_args(cu, ps, [0, 4, 10], [0]), ValueError, "pool_start_host has 1 entries")
    _err(lambda: prime_pool_args(cu, ps, [0, 4, 10]), ValueError, "pool_start_host is not")


@pytest.mark.gpu
def test_device_mismatch_gpu():
    h = torch.randn(10, 4, device="cuda")
    _err(lambda: masked_pool(h, torch.tensor([0, 10], dtype=torch.int32)), ValueError, "cpu.*cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "l2"])
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token", "first_token"])
def test_gpu_big(mode, normalize, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 700, (48,), generator=g).tolist() + [1, 2048]
    hidden, cu, _ = _batch(lengths, 2048, dtype, starts=None, device="cuda")
    ps = torch.tensor([min(l, i % 23) for i, l in enumerate(lengths)], dtype=torch.int32, device="cuda")
    h = hidden.clone().requires_grad_()
    h32 = hidden.float().requires_grad_()
    hlp = hidden.clone().requires_grad_()
    out = masked_pool(h, cu, mode, ps, normalize)
    ref32 = masked_pool_ref(h32, cu, mode, ps, normalize)
    ref_lp = masked_pool_ref(hlp, cu, mode, ps, normalize)
    assert (out.float() - ref32).abs().max() <= 2 * (ref_lp.float() - ref32).abs().max() + 1e-5
    dy = torch.randn_like(out)
    for t in (out, ref_lp):
        t.backward(dy)
    ref32.backward(dy.float())
    assert (h.grad.float() - h32.grad).abs().max() <= 3 * (hlp.grad.float() - h32.grad).abs().max() + 1e-5
