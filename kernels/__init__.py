"""Triton kernels of llm2vec_fast (installed as ``llm2vec_fast.kernels``).

Each public op lives in its own module with a plain PyTorch twin in :mod:`.reference`. The ops are imported lazily so
that ``import llm2vec_fast`` never imports triton: the CPU path does not need it, and under the Triton interpreter the
``TRITON_INTERPRET`` flag must be set before triton is first imported.
"""
import importlib

_LAZY = {
    "flash_attention": ".attention",
    "masked_pool": ".pooling",
    "prime_pool_args": ".pooling",
    "fused_linear_cross_entropy": ".cross_entropy",
    "rms_norm": ".rmsnorm",
    "silu_mul": ".swiglu",
    "gelu_tanh_mul": ".swiglu",
    "rope": ".rotary",
    "dropout_project": ".lora_project",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
