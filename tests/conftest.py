"""Test set-up: the Triton interpreter on machines without CUDA, GPU tests skipped there, shared data paths."""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # must be set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLM2VEC_FAST_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
HAS_CUDA = torch.cuda.is_available()


def _interpreter_blocked():
    """Why the Triton interpreter cannot run here, or None. Triton 3.6's interpreter (the device image's triton)
    turns scalar tensors into loop bounds with int() on one-element arrays, which NumPy 2.4 rejects; later tritons
    read the element first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton
    from triton.runtime import interpreter

    src = Path(interpreter.__file__).read_text()
    numpy_major_minor = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if "int(self.handle.data))" in src and numpy_major_minor >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run on NumPy {numpy.__version__} (int() of "
                "one-element arrays): pip install 'numpy<2.4', or a newer triton")
    return None


def pytest_report_header(config):
    blocked = _interpreter_blocked()
    return [f"WARNING: Triton kernel tests will fail on this machine: {blocked}"] if blocked else []


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        # compiled Triton takes CUDA tensors only: a CPU case that runs a kernel (a triton_cpu test or parameter, or
        # a test of a triton_cpu module that is not gpu-marked) runs under the interpreter alone; on a GPU machine
        # `CUDA_VISIBLE_DEVICES= python -m pytest` runs those (and the GPU tests then skip)
        skip_cpu = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter (no CUDA device visible)")
        for item in items:
            if "triton_cpu" in item.keywords and "gpu" not in item.keywords:
                item.add_marker(skip_cpu)
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def data_dir(shared_dir):
    return shared_dir / "data"


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
