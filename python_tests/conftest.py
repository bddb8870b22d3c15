"""Test configuration.

On a machine without CUDA, Triton kernels run in the interpreter: that needs
TRITON_INTERPRET=1 *before* triton is first imported, so it is set here, at
collection start. On a GPU machine it is left alone and the kernels compile.
"""
import os


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster (and immune to a busy shared CPU).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); runs when a GPU is lent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
