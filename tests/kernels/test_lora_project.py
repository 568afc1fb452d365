"""dropout_project (Triton, interpreter on CPU) against dropout_project_ref with the kernels' own keep mask."""
import pytest
import torch
from llm2vec_fast.kernels import dropout_project
from llm2vec_fast.kernels.lora_project import dropout_project_bwd, dropout_project_fwd, keep_mask
from llm2vec_fast.kernels.reference import dropout_project_ref

from .helpers import check_against_twin, compile_for_hopper, poison_empty

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

HAS_CUDA = torch.cuda.is_available()
# rows: one, below / across the 64-row block; K: across the 64-column block, not a power of two; rank: below the
# dot's 16, at it, above it and not a power of two
CASES = [(1, 64, 4), (7, 80, 16), (97, 130, 20), (130, 64, 8)]


def _cid(c):
    return "N{}-K{}-R{}".format(*c)


def _inputs(N, K, R, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=g)
    w = torch.randn(R, K, generator=g) / K**0.5
    return x.to(device, dtype), w.to(device, dtype)


@pytest.fixture
def poisoned(monkeypatch):
    poison_empty(monkeypatch)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_matches_twin_with_the_kernels_mask(case, dtype, p, poisoned):
    N, K, R = case
    x, w = _inputs(N, K, R, dtype)
    keep = keep_mask(5, p, N, K, "cpu")
    if dtype == torch.float32:
        ours = [t.clone().requires_grad_(True) for t in (x, w)]
        ref = [t.clone().requires_grad_(True) for t in (x, w)]
        y, y_ref = dropout_project(*ours, p, seed=5), dropout_project_ref(*ref, p, _keep=keep)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(dy)
        y_ref.backward(dy)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    else:  # the 2x / 3x rule against the twin in fp16 and in float64, all with the kernels' mask
        check_against_twin(lambda a, b: dropout_project(a, b, p, seed=5),
                           lambda a, b: dropout_project_ref(a, b, p, _keep=keep), [x, w], atol=1e-3)


def test_keep_mask_statistics_and_seeds():
    a, b = keep_mask(1, 0.3, 200, 130, "cpu"), keep_mask(2, 0.3, 200, 130, "cpu")
    assert abs(a.float().mean().item() - 0.7) < 0.01  # 26k draws: 3 sigma is 0.008
    assert torch.equal(a, keep_mask(1, 0.3, 200, 130, "cpu"))
    assert (a != b).float().mean() > 0.3
    assert keep_mask(1, 0.0, 5, 70, "cpu").all()
    # each row's bits depend on (seed, row, column, K) only: a shorter input is a prefix of a longer one
    assert torch.equal(keep_mask(1, 0.3, 77, 130, "cpu"), a[:77])


def test_forward_and_backward_use_one_mask():
    # the product of the forward, the input gradient and the weight gradient all zero the same elements: with w = I
    # (K = R) the output is the dropped-out input, and dx for dy = 1 is 1 / (1 - p) where kept, else 0
    N, K, p = 70, 16, 0.4
    x = (torch.rand(N, K) + 1).requires_grad_(True)
    w = torch.eye(K, requires_grad=True)
    y = dropout_project(x, w, p, seed=9)
    kept = y.detach() != 0
    assert torch.equal(kept, keep_mask(9, p, N, K, "cpu"))
    torch.testing.assert_close(y.detach()[kept], (x.detach() / (1 - p))[kept])
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    # d w[r, k] = sum over rows of dy[n, r] x_dropped[n, k], dy = 1: every row of d w is the column sums
    torch.testing.assert_close(w.grad, (x.detach() * kept / (1 - p)).sum(0).expand(K, K), rtol=1e-5, atol=1e-5)


def test_seed_none_follows_torch_manual_seed():
    x, w = _inputs(33, 64, 8, torch.float32)
    torch.manual_seed(3)
    y1 = dropout_project(x, w, 0.5)
    torch.manual_seed(3)
    assert torch.equal(y1, dropout_project(x, w, 0.5))
    assert not torch.equal(y1, dropout_project(x, w, 0.5))


def test_leading_dims_and_strided_rows():
    x, w = _inputs(24, 80, 8, torch.float32)
    x3 = x.view(2, 12, 80)
    y = dropout_project(x3, w, 0.2, seed=4)
    assert y.shape == (2, 12, 8)
    torch.testing.assert_close(y.view(24, 8), dropout_project(x, w, 0.2, seed=4), rtol=0, atol=0)
    wide = torch.randn(24, 100)
    wide[:, :80] = x
    torch.testing.assert_close(dropout_project(wide[:, :80], w, 0.2, seed=4), y.view(24, 8), rtol=0, atol=0)


def test_weight_gradient_is_deterministic():
    x, w = _inputs(300, 64, 16, torch.float32)
    dy = torch.randn(300, 16)
    first = dropout_project_bwd(dy, x, w, 0.1, 7)[1]
    assert torch.equal(first, dropout_project_bwd(dy, x, w, 0.1, 7)[1])
    assert dropout_project_bwd(dy, x, w, 0.1, 7, need_x=False)[0] is None
    assert dropout_project_fwd(x[:0], w, 0.1, 7).shape == (0, 16)


def test_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., K\] and weight \[R, K\], got x \(4, 8\) and weight"):
        dropout_project(x, torch.randn(2, 7))
    with pytest.raises(ValueError, match="up to 128 rows"):
        dropout_project(x, torch.randn(129, 8))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        dropout_project(x, w, 1.0)
    with pytest.raises(TypeError, match="must be one of"):
        dropout_project(x.long(), w)
    with pytest.raises(TypeError, match="must be tensors"):
        dropout_project(x.tolist(), w)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [(4096, 2048, 16), (1000, 5504, 16), (777, 4096, 64)], ids=_cid)
def test_gpu_bf16_matches_twin(case):
    N, K, R = case
    x, w = _inputs(N, K, R, torch.bfloat16, device="cuda")
    keep = keep_mask(5, 0.05, N, K, "cuda")
    frac = keep.float().mean().item()
    assert abs(frac - 0.95) < 0.01, frac
    check_against_twin(lambda a, b: dropout_project(a, b, 0.05, seed=5),
                       lambda a, b: dropout_project_ref(a, b, 0.05, _keep=keep), [x, w], atol=1e-2)


_AOT = r"""
import llm2vec_fast.kernels.lora_project as M

for name, consts in (("_dp_fwd_kernel", dict(K=2048, R=16, BN=64, BK=64, BR=16, HAS_DROPOUT=True, PREC="tf32")),
                     ("_dp_dw_kernel", dict(K=5504, R=16, BN=64, BK=64, BR=16, HAS_DROPOUT=True, PREC="tf32")),
                     ("_dp_dx_kernel", dict(K=2048, R=20, BN=64, BK=64, BR=32, HAS_DROPOUT=True, PREC="tf32")),
                     ("_keep_mask_kernel", dict(K=2048, BN=64, BK=64))):
    fn = getattr(M, name)
    ptrs = {"x": "*bf16", "w": "*bf16", "y": "*bf16", "dy": "*bf16", "dx": "*bf16", "dw": "*fp32", "m": "*i8"}
    sig = {n: ("constexpr" if n in consts else ptrs.get(n) or ("i64" if n == "seed" else
               "fp32" if n in ("p", "scale") else "i32")) for n in fn.arg_names}
    attrs = aligned(fn, sig)
    sm90(fn, sig, consts, attrs, num_warps=4, num_stages=2)
    print("OK", name)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    compile_for_hopper(_AOT, tmp_path, expected_ok=4)
