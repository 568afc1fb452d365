"""Freed CPU memory kept for reuse during CPU encodes (llm2vec_fast.cpu_memory)."""
import contextlib
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from llm2vec_fast import cpu_memory
from llm2vec_fast.encoder import LLM2Vec


class FakeLibc:
    """Records mallopt / malloc_trim calls; ``refuse`` lists the (parameter, value) pairs it rejects (returns 0)."""

    def __init__(self, refuse=()):
        self.calls, self.refuse = [], set(refuse)

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 0 if (param, value) in self.refuse else 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fresh(monkeypatch):
    """A process state in which the thresholds were never touched, with a fake glibc."""
    fake = FakeLibc()
    monkeypatch.setattr(cpu_memory, "_state", {"libc": None, "tuned": None})
    monkeypatch.setattr(cpu_memory, "_load_libc", lambda: fake)
    monkeypatch.delenv("LLM2VEC_FAST_CPU_MALLOC", raising=False)
    return fake


def test_thresholds_are_raised_once_per_process(fresh):
    assert cpu_memory.keep_freed_memory()
    assert cpu_memory.keep_freed_memory()
    assert fresh.calls == [("mallopt", -3, cpu_memory.MMAP_THRESHOLD), ("mallopt", -1, cpu_memory.TRIM_THRESHOLD)]


def test_a_refused_mmap_threshold_falls_back_to_glibcs_maximum(fresh):
    fresh.refuse = {(-3, cpu_memory.MMAP_THRESHOLD)}
    assert cpu_memory.keep_freed_memory()
    assert [c[2] for c in fresh.calls] == [cpu_memory.MMAP_THRESHOLD, 32 << 20, cpu_memory.TRIM_THRESHOLD]


def test_refused_everywhere_means_off_and_nothing_is_trimmed(fresh):
    fresh.refuse = {(-3, cpu_memory.MMAP_THRESHOLD), (-3, 32 << 20)}
    assert not cpu_memory.keep_freed_memory()
    assert not cpu_memory.release_freed_memory()
    assert all(c[0] == "mallopt" for c in fresh.calls)


def test_opt_out_leaves_malloc_alone(fresh, monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_CPU_MALLOC", "0")
    assert not cpu_memory.keep_freed_memory()
    with cpu_memory.cpu_work("cpu"):
        pass
    assert fresh.calls == []


@pytest.mark.parametrize("confstr", [lambda name: None, lambda name: (_ for _ in ()).throw(ValueError(name))])
def test_not_glibc_means_nothing(monkeypatch, confstr):
    monkeypatch.setattr(cpu_memory, "_state", {"libc": None, "tuned": None})
    monkeypatch.setattr(cpu_memory.os, "confstr", confstr)
    assert cpu_memory._load_libc() is None
    assert not cpu_memory.keep_freed_memory()


@pytest.mark.parametrize("long_call", [True, False])
def test_cpu_work_trims_only_after_a_long_call(fresh, monkeypatch, long_call):
    monkeypatch.setattr(cpu_memory, "TRIM_AFTER_S", 0.0 if long_call else 3600.0)
    with cpu_memory.cpu_work(torch.device("cpu")):
        pass
    assert (("malloc_trim", 0) in fresh.calls) == long_call
    assert fresh.calls[0] == ("mallopt", -3, cpu_memory.MMAP_THRESHOLD)


def test_cpu_work_trims_when_the_work_raises(fresh, monkeypatch):
    monkeypatch.setattr(cpu_memory, "TRIM_AFTER_S", 0.0)
    with pytest.raises(RuntimeError, match="boom"), cpu_memory.cpu_work("cpu"):
        raise RuntimeError("boom")
    assert fresh.calls[-1] == ("malloc_trim", 0)


def test_other_devices_are_left_alone(fresh):
    with cpu_memory.cpu_work(torch.device("meta")):
        pass
    assert fresh.calls == []


def test_encode_on_cpu_runs_inside_cpu_work(tiny_encoder_dir, monkeypatch):
    seen = []

    @contextlib.contextmanager
    def spy(device):
        seen.append(torch.device(device).type)
        yield

    monkeypatch.setattr("llm2vec_fast.encoder.cpu_work", spy)
    l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    emb = l2v.encode(["a short text", "another one, a little longer"], show_progress_bar=False)
    assert seen == ["cpu"] and emb.shape == (2, 64) and torch.isfinite(emb).all()


@pytest.mark.skipif(platform.system() != "Linux" or not cpu_memory._is_glibc(), reason="glibc only")
@pytest.mark.parametrize("keep", [False, True])
def test_glibc_serves_a_large_tensor_from_the_heap_once_tuned(keep):
    # glibc's own accounting (mallinfo2): bytes in mmapped blocks while a 64 MiB tensor is alive; in a fresh process,
    # since the thresholds are process-wide
    script = textwrap.dedent(f"""
        import ctypes
        import torch
        from llm2vec_fast import cpu_memory

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        if {keep}:
            assert cpu_memory.keep_freed_memory()
        before = libc.mallinfo2().hblkhd
        t = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB, above glibc's own 32 MiB ceiling
        t.fill_(1.0)
        print(libc.mallinfo2().hblkhd - before)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("glibc without mallinfo2 (before 2.33)")
        raise
    mapped = int(out.stdout.split()[-1])
    if keep:
        assert mapped < (1 << 20), f"{mapped} bytes still mmapped with the thresholds raised"
    else:
        assert mapped >= (64 << 20), f"glibc's default should mmap a 64 MiB block, saw {mapped} bytes"
