"""Edge cases of the public kernel ops found by review: gradients through the attention's lse, non-finite values
outside a pooled span, zero-width features, and argument types (kernel and twin raise the same errors)."""
import pytest
import torch
from llm2vec_fast.kernels import dropout_project, flash_attention, fused_linear_cross_entropy, masked_pool, rms_norm
from llm2vec_fast.kernels.reference import (
    dropout_project_ref,
    flash_attention_ref,
    fused_linear_cross_entropy_ref,
    masked_pool_ref,
    rms_norm_ref,
)

# tensors on the CPU unless a test is gpu-marked: the interpreter runs these (skipped where it is off)
pytestmark = pytest.mark.triton_cpu

CU = torch.tensor([0, 3, 7], dtype=torch.int32)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 4, 32, generator=g), torch.randn(7, 2, 32, generator=g), torch.randn(7, 2, 32, generator=g))


@pytest.mark.parametrize("use", ["o+lse", "lse"])
@pytest.mark.parametrize("window", [(-1, -1), (1, 2)], ids=["full", "window"])
def test_attention_lse_is_differentiable_as_in_the_twin(use, window):
    """A loss on the log-sum-exp reaches q and k (d lse_i / d s_ij = P_ij), as through the twin's logsumexp."""
    grads = []
    for fn in (flash_attention, flash_attention_ref):
        q, k, v = (x.clone().requires_grad_(True) for x in _qkv())
        o, lse = fn(q, k, v, CU, 4, return_lse=True, window_size=window, softcap=3.0)
        w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1))
        loss = (lse * w).sum() + (o.sum() if use == "o+lse" else 0)
        grads.append(torch.autograd.grad(loss, (q, k, v), allow_unused=True))
    for a, b in zip(*grads, strict=True):
        if b is None or not b.abs().sum():  # v gets nothing from lse alone
            assert a is None or not a.abs().sum()
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_pooling_ignores_non_finite_values_outside_the_span():
    h = torch.randn(7, 4)
    h[0] = float("inf")  # an instruction token of sequence 0, not pooled
    h[4] = float("nan")  # a token before sequence 1's pooled span
    ps = torch.tensor([1, 2], dtype=torch.int32)
    for mode in ("mean", "weighted_mean", "last_token"):
        for fn in (masked_pool, masked_pool_ref):
            out = fn(h, CU, mode, ps)
            assert out.isfinite().all(), (fn.__name__, mode)
        torch.testing.assert_close(masked_pool(h, CU, mode, ps), masked_pool_ref(h, CU, mode, ps))


def test_zero_width_features_match_the_twin():
    h = torch.randn(7, 0, requires_grad=True)
    assert masked_pool(h, CU).shape == masked_pool_ref(h, CU).shape == (2, 0)
    x, w = torch.randn(5, 0, requires_grad=True), torch.randn(4, 0, requires_grad=True)
    out = dropout_project(x, w, 0.1, seed=3)
    torch.testing.assert_close(out, dropout_project_ref(x, w, 0.1, seed=3))
    assert out.shape == (5, 4) and not out.any()
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_dropout_project_twin_draws_its_seed_from_torch():
    x, w = torch.randn(6, 16), torch.randn(4, 16)
    torch.manual_seed(1)
    a = dropout_project_ref(x, w, 0.5)
    torch.manual_seed(2)
    b = dropout_project_ref(x, w, 0.5)
    torch.manual_seed(1)
    assert not torch.equal(a, b) and torch.equal(a, dropout_project_ref(x, w, 0.5))


def _attn(fn, **kw):
    q, k, v = _qkv()
    return fn(q, k, v, CU, 4, **kw)


BAD = [
    pytest.param("attention", dict(dropout_p="0.1"), TypeError, "dropout_p must be a number in", id="dropout-str"),
    pytest.param("attention", dict(dropout_p=True), TypeError, "dropout_p must be a number", id="dropout-bool"),
    pytest.param("attention", dict(dropout_p=0.1, seed="abc"), TypeError, "seed must be an int or None, got str",
                 id="seed-str"),
    pytest.param("attention", dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int or None, got float",
                 id="seed-float"),
    pytest.param("project", dict(dropout_p="0.1"), TypeError, "dropout_p must be a number", id="project-dropout"),
    pytest.param("project", dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int", id="project-seed"),
    pytest.param("ce", dict(ignore_index=2.5), TypeError, "ignore_index must be an int .*got float 2.5",
                 id="ignore-float"),
    pytest.param("ce", dict(ignore_index=None), TypeError, "ignore_index must be an int .*got NoneType",
                 id="ignore-none"),
    pytest.param("pool", dict(mode=["mean"]), ValueError, r"unknown pooling mode \['mean'\]; expected one of",
                 id="mode-list"),
    pytest.param("pool", dict(normalize="no"), TypeError, "normalize must be True or False, got str", id="normalize"),
    pytest.param("norm", dict(unit_offset="no"), TypeError, "unit_offset must be True or False, got str",
                 id="unit-offset"),
]


@pytest.mark.parametrize("op, kw, exc, message", BAD)
@pytest.mark.parametrize("twin", [False, True], ids=["kernel", "twin"])
def test_argument_types_are_named(op, kw, exc, message, twin):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(exc, match=message):
        if op == "attention":
            _attn(flash_attention_ref if twin else flash_attention, **kw)
        elif op == "project":
            (dropout_project_ref if twin else dropout_project)(torch.randn(5, 8), torch.randn(4, 8), **kw)
        elif op == "ce":
            h, w = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
            y = torch.tensor([1, 2, 3, 4])
            (fused_linear_cross_entropy_ref if twin else fused_linear_cross_entropy)(h, w, y, **kw)
        elif op == "pool":
            args = {"mode": "mean", **kw}
            (masked_pool_ref if twin else masked_pool)(torch.randn(7, 4), CU, args.pop("mode"), None, **args)
        else:
            (rms_norm_ref if twin else rms_norm)(torch.randn(3, 8), torch.randn(8), **kw)


def test_attention_twin_refuses_integer_inputs():
    q = torch.randint(-3, 4, (7, 2, 32))
    with pytest.raises(TypeError, match="q, k, v must be floating point, got torch.int64"):
        flash_attention_ref(q, q, q, CU, 4)
    with pytest.raises(TypeError, match="floating point, got torch.bool"):
        flash_attention_ref(q > 0, q > 0, q > 0, CU, 4)


def _double_backward_cases():
    from llm2vec_fast.kernels import rope, silu_mul

    g = torch.Generator().manual_seed(4)
    q, k, v = _qkv()
    cos, sin = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    return {
        "attention": (lambda x: flash_attention(x, k, v, CU, 4), q),
        "pool": (lambda x: masked_pool(x, CU, "weighted_mean"), torch.randn(7, 8, generator=g)),
        "ce": (lambda x: fused_linear_cross_entropy(x, torch.randn(6, 8, generator=g), torch.tensor([1, 2, 3, 4])),
               torch.randn(4, 8, generator=g)),
        "project": (lambda x: dropout_project(x, torch.randn(4, 8, generator=g), 0.1, seed=2),
                    torch.randn(5, 8, generator=g)),
        "norm": (lambda x: rms_norm(x, torch.randn(8, generator=g)), torch.randn(3, 8, generator=g)),
        "rope": (lambda x: rope(x, k, cos, sin)[0], q),
        "swiglu": (lambda x: silu_mul(x, torch.randn(3, 8, generator=g)), torch.randn(3, 8, generator=g)),
    }


@pytest.mark.parametrize("op", ["attention", "pool", "ce", "project", "norm", "rope", "swiglu"])
def test_double_backward_raises_instead_of_dropping_terms(op):
    """A gradient penalty (create_graph=True, then a loss on the gradient) would silently miss every second-order
    term of a custom backward; each op says so instead."""
    fn, x = _double_backward_cases()[op]
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (dx,) = torch.autograd.grad(y.pow(2).sum() if y.dim() else y, x)  # first order: fine
    assert dx.shape == x.shape
    y = fn(x)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(y.pow(2).sum() if y.dim() else y, x, create_graph=True)


@pytest.mark.parametrize("window", [(0, 2**63 - 1), (2**63 - 1, 2**63 - 1), (2**70, 0), (3, 7)])
def test_window_sides_of_the_pack_length_or_more_are_unlimited(window):
    """Any side >= T is no bound at all (no in-sequence distance reaches it): same result as -1, no int64 overflow
    in the kernel's i + right, no Triton error for a value past int64."""
    q, k, v = _qkv()
    want = flash_attention_ref(q, k, v, CU, 4, window_size=tuple(-1 if w >= 7 else w for w in window))
    for fn in (flash_attention, flash_attention_ref):
        got = fn(q, k, v, CU, 4, window_size=window)
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_huge_max_seqlen_launches_no_more_than_the_pack():
    import time

    q, k, v = _qkv()
    want = flash_attention(q, k, v, CU, 4)
    t0 = time.perf_counter()
    got = flash_attention(q, k, v, CU, 2**40)  # programs for 2**40 rows would never finish in the interpreter
    assert time.perf_counter() - t0 < 60
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("kw, exc, message", [
    (dict(causal="no"), TypeError, "causal must be True or False, got str"),
    (dict(return_lse=1), TypeError, "return_lse must be True or False, got int"),
    (dict(softcap="1"), TypeError, "softcap must be a real number, got str"),
    (dict(scale="1"), TypeError, "scale must be a real number, got str"),
    (dict(scale=True), TypeError, "scale must be a real number, got bool"),
])
@pytest.mark.parametrize("twin", [False, True], ids=["kernel", "twin"])
def test_attention_flags_and_numbers_are_typed(kw, exc, message, twin):
    with pytest.raises(exc, match=message):
        _attn(flash_attention_ref if twin else flash_attention, **kw)


def test_rope_with_learned_tables_gives_their_gradients():
    from llm2vec_fast.kernels import rope
    from llm2vec_fast.kernels.reference import rope_ref

    g = torch.Generator().manual_seed(5)
    q, k, _ = _qkv()
    cos0, sin0 = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    w = torch.randn(7, 4, 32, generator=g)
    grads = []
    for fn in (rope, rope_ref):
        xs = [t.clone().requires_grad_(True) for t in (q, k, cos0, sin0)]
        qo, ko = fn(*xs)
        ((qo * w).sum() + ko.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads, strict=True):
        assert a is not None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_project_with_no_output_column_backpropagates():
    x, w = torch.randn(3, 70, requires_grad=True), torch.randn(0, 70, requires_grad=True)
    out = dropout_project(x, w, 0.1, seed=1)
    assert out.shape == (3, 0)
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any() and w.grad.shape == w.shape


def test_fp16_logit_overflow_is_an_error_not_nan():
    h, w = torch.full((3, 64), 40.0, dtype=torch.float16), torch.full((5, 64), 30.0, dtype=torch.float16)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="float16 logits overflowed"):
        fused_linear_cross_entropy(h, w, y)
    h[0, 0] = float("nan")  # a NaN input is no overflow: NaN out, as the twin
    assert fused_linear_cross_entropy(h, w, y).isnan()
    # in range: a finite loss equal to the twin's
    h, w = h.fill_(0.5), w.fill_(0.25)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, y), fused_linear_cross_entropy_ref(h, w, y))
