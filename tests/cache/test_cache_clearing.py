"""Plaintext zeroed at garbage collection is zeroed even when the collection runs inside a compile trace."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pqc_kv_cache.cache.clearing import zero_at_collection


def test_a_finalizer_running_inside_a_fake_tensor_mode_still_zeroes_real_tensors():
    # a collection can run while torch.compile traces (fake-tensor mode active): the zeroing must reach the
    # real buffers instead of being refused by the mode
    plain = [torch.full((2, 3), 7.0), torch.full((4,), 9, dtype=torch.int16), torch.ones(3, dtype=torch.bfloat16)]
    with FakeTensorMode():
        zero_at_collection(plain)
    assert not any(t.any() for t in plain)
