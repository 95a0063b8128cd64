"""Test setup that must happen before triton is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels in Triton's interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_POISON", "1")  # kernel outputs start as NaN / -1

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def shared_data():
    """Path of ../shared/data (real tokenizer and shards); skips the test when absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not present at {path}")
    return path
