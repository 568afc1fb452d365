"""fused_linear_cross_entropy (Triton, interpreter on CPU) against fused_linear_cross_entropy_ref."""
import llm2vec_fast.kernels.cross_entropy as ce_mod
import pytest
import torch
import torch.nn.functional as F
from llm2vec_fast.kernels import fused_linear_cross_entropy
from llm2vec_fast.kernels.reference import fused_linear_cross_entropy_ref

from .helpers import poison_empty

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

IGN = -100


def _inputs(N, H, V, dtype, bias, seed=0, ignore="some", device="cpu", chunk=None):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 0.5).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0] = V - 1  # the last vocab entry (tail of the last block)
    if ignore == "some":
        labels[torch.rand(N, generator=g) < 0.25] = IGN
        if chunk and N > 2 * chunk:
            labels[chunk:2 * chunk] = IGN  # one whole chunk ignored
    elif ignore == "all":
        labels[:] = IGN
    return hidden, weight, b, labels.to(device)


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _torch_lp(hidden, weight, labels, bias):
    """The plain low-precision torch path (logits in the input dtype), the peer whose error sets the tolerance."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGN)


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled torch.empty / empty_like in the kernel module, so an unwritten row or gradient fails."""
    poison_empty(monkeypatch)


CASES = [  # N, H, V, chunk rows, block of V: rows straddle chunk edges, V straddles blocks
    pytest.param(45, 24, 37, 8, 16, id="N45-H24-V37-chunk8-bv16"),
    pytest.param(30, 40, 1000, 7, 256, id="N30-H40-V1000-chunk7-bv256"),
    pytest.param(9, 16, 1500, None, None, id="N9-H16-V1500-auto"),
]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("N,H,V,chunk,bv", CASES)
def test_fp32_loss_and_grads(N, H, V, chunk, bv, bias, poisoned):
    hidden, weight, b, labels = _inputs(N, H, V, torch.float32, bias, chunk=chunk)
    h1, w1, b1 = _leaves(hidden, weight, b)
    h2, w2, b2 = _leaves(hidden, weight, b)
    loss = fused_linear_cross_entropy(h1, w1, labels, bias=b1, _chunk_rows=chunk, _block_v=bv)
    ref = fused_linear_cross_entropy_ref(h2, w2, labels, bias=b2)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    for ours, theirs in ((h1, h2), (w1, w2), (b1, b2)):
        if ours is not None:
            assert not ours.grad.isnan().any()
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    # ignored rows get exactly zero gradient
    assert (h1.grad[labels == IGN] == 0).all()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fp16_error_rules(bias):
    N, H, V, chunk = 40, 32, 1000, 16
    hidden, weight, b, labels = _inputs(N, H, V, torch.float16, bias, seed=1, chunk=chunk)
    h, w, bb = _leaves(hidden, weight, b)
    h32, w32, b32 = _leaves(hidden, weight, b, dtype=torch.float32)
    hlp, wlp, blp = _leaves(hidden, weight, b)
    loss = fused_linear_cross_entropy(h, w, labels, bias=bb, _chunk_rows=chunk, _block_v=256)
    ref32 = fused_linear_cross_entropy_ref(h32, w32, labels, bias=b32)
    ref_lp = _torch_lp(hlp, wlp, labels, blp)
    assert abs(loss.item() - ref32.item()) <= 2 * abs(ref_lp.item() - ref32.item()) + 1e-4
    for t in (loss, ref32, ref_lp):
        t.backward()
    for ours, r32, rlp in ((h, h32, hlp), (w, w32, wlp), (bb, b32, blp)):
        if ours is None:
            continue
        assert ours.grad.dtype == torch.float16
        err = (ours.grad.float() - r32.grad).abs().max().item()
        tol = 3 * (rlp.grad.float() - r32.grad).abs().max().item() + 1e-5
        assert err <= tol, (err, tol)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_all_ignored_gives_zero_loss_and_grads(bias, poisoned):
    hidden, weight, b, labels = _inputs(12, 8, 37, torch.float32, bias, ignore="all")
    h1, w1, b1 = _leaves(hidden, weight, b)
    h2, w2, b2 = _leaves(hidden, weight, b)
    loss = fused_linear_cross_entropy(h1, w1, labels, bias=b1)
    ref = fused_linear_cross_entropy_ref(h2, w2, labels, bias=b2)
    assert loss.item() == 0.0 and ref.item() == 0.0
    loss.backward()
    ref.backward()
    for t in (h1, w1, b1, h2, w2, b2):
        if t is not None:
            assert (t.grad == 0).all()


def test_empty_input():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(37, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and (w.grad == 0).all()


def test_only_hidden_needs_grad_and_grad_scaling():
    # the LoRA case: a frozen LM head; also the incoming gradient (3x) must scale the precomputed one
    hidden, weight, _, labels = _inputs(20, 16, 37, torch.float32, False)
    h1, h2 = _leaves(hidden, hidden)
    (3 * fused_linear_cross_entropy(h1, weight, labels, _chunk_rows=8)).backward()
    (3 * fused_linear_cross_entropy_ref(h2, weight, labels)).backward()
    assert weight.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_strided_inputs(poisoned):
    # hidden and weight as transposed views (not contiguous): gradients come back right, in the inputs' shapes
    hidden, weight, _, labels = _inputs(20, 16, 37, torch.float32, False)
    h1 = hidden.t().contiguous().requires_grad_()
    w1 = weight.t().contiguous().requires_grad_()
    h2, w2 = _leaves(hidden, weight)
    fused_linear_cross_entropy(h1.t(), w1.t(), labels, _chunk_rows=8).backward()
    fused_linear_cross_entropy_ref(h2, w2, labels).backward()
    torch.testing.assert_close(h1.grad.t(), h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad.t(), w2.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_skips_gradient_work(monkeypatch):
    hidden, weight, b, labels = _inputs(20, 16, 37, torch.float32, True)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(ce_mod.torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, bias=None, _chunk_rows=8)
    assert len(calls) == 3  # the logits matmul of each of the 3 chunks, no grad matmul
    torch.testing.assert_close(loss, fused_linear_cross_entropy_ref(hidden, weight, labels), rtol=1e-5, atol=1e-6)
    assert loss.grad_fn is None


def test_second_backward_raises():
    hidden, weight, _, labels = _inputs(6, 8, 37, torch.float32, False)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already run once"):
        loss.backward()


def test_default_chunk_rows():
    pick = ce_mod._pick_chunk_rows
    budget = ce_mod.LOGITS_BUDGET_BYTES
    rows = pick(4096, 128256, 2)
    assert rows % 64 == 0 and rows * 128256 * 2 <= budget and rows >= 512
    assert pick(10, 128256, 2) == 10  # never more rows than there are
    assert pick(10**6, 10**9, 4) == 64  # a floor keeps the matmul efficient


def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("fn", [fused_linear_cross_entropy, fused_linear_cross_entropy_ref], ids=["ours", "ref"])
def test_errors(fn):
    h, w = torch.randn(4, 8), torch.randn(37, 8)
    y = torch.tensor([0, 5, IGN, 36])
    _err(lambda: fn(h, w, torch.tensor([0, 37, IGN, 1])), ValueError, r"labels\[1\] = 37 .*\[0, 37\)")
    _err(lambda: fn(h, w, torch.tensor([0, -1, IGN, 1])), ValueError, r"labels\[1\] = -1")
    _err(lambda: fn(h[None], w, y), ValueError, r"hidden must be a 2-D.*\(1, 4, 8\)")
    _err(lambda: fn(h, w[:, :7], y), ValueError, r"\[V, 8\].*\(37, 7\)")
    _err(lambda: fn(h, w, y[:3]), ValueError, "4 entries.*got 3")
    _err(lambda: fn(h, w.half(), y), TypeError, "weight dtype torch.float16")
    _err(lambda: fn(h, w, y.float()), TypeError, "labels must be int64")
    _err(lambda: fn(h, w, y, bias=torch.randn(36)), ValueError, r"\(37,\).*\(36,\)")
    _err(lambda: fn(h.long(), w.long(), y), TypeError, "torch.int64")
    # a label equal to a custom ignore_index is fine, -100 then is out of range
    assert fn(h, w, torch.tensor([0, 5, 7, 36]), ignore_index=7).item() > 0
    _err(lambda: fn(h, w, y, ignore_index=7), ValueError, r"labels\[2\] = -100")


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,H,V", [(1638, 2048, 49152), (300, 1024, 128256)], ids=["N1638-V49152", "N300-V128256"])
def test_gpu_big(N, H, V, dtype, bias):
    hidden, weight, b, labels = _inputs(N, H, V, dtype, bias, device="cuda")
    h, w, bb = _leaves(hidden, weight, b)
    h32, w32, b32 = _leaves(hidden, weight, b, dtype=torch.float32)
    hlp, wlp, blp = _leaves(hidden, weight, b)
    # a small chunk forces several chunks (the default budget would take all rows at once here)
    loss = fused_linear_cross_entropy(h, w, labels, bias=bb, _chunk_rows=256)
    ref32 = fused_linear_cross_entropy_ref(h32, w32, labels, bias=b32)
    ref_lp = _torch_lp(hlp, wlp, labels, blp)
    assert abs(loss.item() - ref32.item()) <= 2 * abs(ref_lp.item() - ref32.item()) + 1e-3
    for t in (loss, ref32, ref_lp):
        t.backward()
    for ours, r32, rlp in ((h, h32, hlp), (w, w32, wlp), (bb, b32, blp)):
        if ours is not None:
            err = (ours.grad.float() - r32.grad).abs().max().item()
            assert err <= 3 * (rlp.grad.float() - r32.grad).abs().max().item() + 1e-5, err
