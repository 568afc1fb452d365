"""Host-side launch arithmetic (kernels/_launch.py) equals triton's own helpers, which cost ~5 µs per host call."""
import triton
from llm2vec_fast.kernels._launch import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for a in list(range(0, 300)) + [65535, 65536, 65537, 2**31 + 5]:
        for b in (1, 2, 3, 7, 16, 64, 128, 4096):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(0, 4100)) + [2**20 - 1, 2**20, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_public_ops_run_on_their_inputs_device():
    """Triton launches on the current CUDA device: every public op makes its first input's device current (a no-op
    for CPU tensors and for the current device), and keeps its signature for help() and inspect."""
    import contextlib
    import inspect

    import torch
    from llm2vec_fast.kernels._launch import device_of

    from llm2vec_fast import kernels

    assert isinstance(device_of(torch.zeros(1)), contextlib.nullcontext) and isinstance(device_of(None),
                                                                                         contextlib.nullcontext)
    for name in kernels.__all__:
        op = getattr(kernels, name)
        if name.startswith("prime_"):
            continue
        assert getattr(op, "__wrapped__", None) is not None, f"{name} is not wrapped by on_input_device"
        assert inspect.signature(op) == inspect.signature(op.__wrapped__)


def test_ops_on_a_second_gpu_while_the_first_is_current():
    import pytest
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from llm2vec_fast.kernels import flash_attention, rms_norm
    from llm2vec_fast.kernels.reference import flash_attention_ref, rms_norm_ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    q, k, v = (torch.randn(40, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=dev)
    torch.testing.assert_close(flash_attention(q, k, v, cu, 25).float(),
                               flash_attention_ref(q, k, v, cu, 25).float(), atol=2e-2, rtol=2e-2)
    x, w = torch.randn(8, 64, device=dev), torch.randn(64, device=dev)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w), atol=1e-5, rtol=1e-5)
