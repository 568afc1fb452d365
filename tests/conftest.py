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


def pytest_collection_modifyitems(config, items):
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
