"""What the machine running the tests can do."""

from __future__ import annotations

import torch


def has_cuda() -> bool:
    """A CUDA device and CuPy to launch the kernels on it."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True
