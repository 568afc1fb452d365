"""Shared by the kernel tests: the low-precision tolerance rule and the Hopper compile check."""
import os
import subprocess
import sys

import pytest


def assert_lowp_close(ours, ref_lp, exact, factor, atol=1e-5):
    """STYLE.md's rule: ``max|ours − exact| ≤ factor · max|ref_lp − exact| + atol`` (2 for outputs, 3 for
    gradients), where ``ref_lp`` is the twin run in the test's low precision and ``exact`` in float64."""
    err = (ours.double() - exact).abs().max().item()
    tol = factor * (ref_lp.double() - exact).abs().max().item() + atol
    assert err <= tol, (err, tol)


# run first in every compile script: `sm90(fn, sig, consts, attrs, **options)` compiles one kernel for Hopper and
# returns it (`aligned(fn, sig)` gives the usual attrs); it prints SKIP and exits 0 where this triton lacks the
# internal API, COMPILE ERROR and exits 1 on a compile error
_AOT_PRELUDE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
except ImportError as e:
    print("SKIP", e); sys.exit(0)


def aligned(fn, sig, also=()):
    # tt.divisibility 16 on every pointer and stride argument (and those named in `also`), as the launchers'
    # specialisation marks them for contiguous tensors
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if sig[n].startswith("*") or n.startswith("stride") or n in also}


def sm90(fn, sig, consts, attrs, **options):
    try:
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    except Exception as e:  # an internal API this triton does not have
        print("SKIP", type(e).__name__, e); sys.exit(0)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except CompilationError as e:
        print("COMPILE ERROR", fn.__name__, e); sys.exit(1)
"""


def compile_for_hopper(script, tmp_path, expected_ok):
    """Run ``script`` after a prelude that defines ``sm90(fn, sig, consts, attrs, **options)`` (``triton.compile``
    for ``GPUTarget("cuda", 90, 32)``); the script prints one ``OK`` per kernel. It runs in a subprocess without
    ``TRITON_INTERPRET`` and with a fresh cache, so it really compiles: GPU-only compile errors surface without a
    GPU. Skips where this triton lacks the internal API."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _AOT_PRELUDE + script], capture_output=True, text=True, env=env,
                       timeout=600)
    out = r.stdout + r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.count("OK") >= expected_ok, out


def check_against_twin(op, twin, inputs, exact=None, seed=0, atol=1e-5):
    """``op`` against its PyTorch ``twin`` on ``inputs`` (tensors, each a leaf that needs a gradient): the output by
    the 2× rule, every input's gradient (for one random upstream gradient) by the 3×, each against the twin run in
    the inputs' own precision and in ``exact`` (float64 by default). Returns (our leaves, the twin's low-precision
    leaves, the upstream gradient), the leaves' ``.grad`` filled, for further checks."""
    import torch

    exact = exact or torch.float64
    ours = [x.detach().clone().requires_grad_(True) for x in inputs]
    low = [x.detach().clone().requires_grad_(True) for x in inputs]
    high = [x.detach().to(exact).requires_grad_(True) for x in inputs]
    out, ref_lp, ref_hi = op(*ours), twin(*low), twin(*high)
    assert out.dtype == ref_lp.dtype, (out.dtype, ref_lp.dtype)
    assert_lowp_close(out, ref_lp, ref_hi, 2, atol)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    out.backward(dy)
    ref_lp.backward(dy)
    ref_hi.backward(dy.to(exact))
    for a, b, c in zip(ours, low, high, strict=True):
        assert a.grad.dtype == a.dtype
        assert_lowp_close(a.grad, b.grad, c.grad, 3, atol)
    return ours, low, dy


def poison_empty(monkeypatch):
    """NaN-fill every floating ``torch.empty`` / ``torch.empty_like`` for the rest of a test (the kernel modules
    allocate their outputs with them), so an element a kernel forgets to write fails the comparison."""
    import torch

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(real_empty_like(*a, **k)))
