"""Freed CPU memory kept for reuse during CPU encodes (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves an allocation above its mmap threshold (at most 32 MiB
even after its own adjustment) with a fresh ``mmap`` and gives it back to the kernel when it is freed, so every
large activation is first-touched page by page again: on a packed 16k-token batch of SmolLM2 the MLP's
activation ([T, 1536] float32, 100 MB) then costs about four times its arithmetic (43 ms against 11 ms on two
cores), and a CPU encode runs about a quarter slower than it needs to (``benchmarks/bench_cpu_memory.py``).

:func:`keep_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``) once per process, so large blocks
come from the heap and stay there for the next batch, as the CUDA caching allocator keeps device memory.
:func:`release_freed_memory` (``malloc_trim``) hands the free pages back; :func:`cpu_work` does both around a
piece of CPU work, trimming after calls long enough for the trim (tens of milliseconds) not to matter.
The thresholds are process-wide and stay raised; glibc still trims the heap's top by itself above
``TRIM_THRESHOLD``. ``LLM2VEC_FAST_CPU_MALLOC=0`` leaves malloc alone. Elsewhere (macOS, Windows, musl) every
function here does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
import time

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# allocations up to MMAP_THRESHOLD come from the heap (glibc refuses values above its limit: then its 32 MiB
# maximum is tried, which still covers a 16k-token batch's hidden states but not its MLP activation)
MMAP_THRESHOLD = 1 << 30
_MMAP_FALLBACK = 32 << 20
# free memory at the heap's top beyond this goes back to the kernel without a trim call
TRIM_THRESHOLD = 1 << 30
# cpu_work trims after a call at least this long (seconds)
TRIM_AFTER_S = 1.0

_lock = threading.Lock()
_state = {"libc": None, "tuned": None}  # tuned: None (not tried), False (unavailable or off), True


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or a C library that does not know the name
        return False


def _load_libc():
    """glibc's handle, or None where the C library is not glibc."""
    if platform.system() != "Linux" or not _is_glibc():
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; returns whether they are raised.

    False where the C library is not glibc, where ``LLM2VEC_FAST_CPU_MALLOC=0``, or where glibc refused both values.
    """
    with _lock:
        if _state["tuned"] is not None:
            return _state["tuned"]
        libc = _load_libc() if os.environ.get("LLM2VEC_FAST_CPU_MALLOC", "1") != "0" else None
        ok = False
        if libc is not None:
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or
                      libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FALLBACK))
            ok = ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        _state.update(libc=libc if ok else None, tuned=ok)
        return ok


def release_freed_memory() -> bool:
    """Return the heap's free pages to the kernel (``malloc_trim(0)``); False where nothing was kept."""
    libc = _state["libc"]
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def cpu_work(device):
    """Around CPU work on ``device``: keep freed memory during it, and release it after a call that ran at least
    ``TRIM_AFTER_S`` seconds. Other devices: nothing."""
    import torch

    if torch.device(device).type != "cpu" or not keep_freed_memory():
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        if time.perf_counter() - start >= TRIM_AFTER_S:
            release_freed_memory()
