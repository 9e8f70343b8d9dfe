"""Fixtures shared by the cache tests: ``mode`` runs a test once per residency mode of EncryptedCache;
``fresh_dynamo`` gives a compiled test a reset dynamo with room for its recompiles."""

from __future__ import annotations

import pytest

MODES = ["sealed", "working_set"]


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def fresh_dynamo():
    """Every model's forward goes through one transformers wrapper, a single code object for dynamo: its
    recompile limit would count the graphs of every model and cache class compiled in this process."""
    import torch

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()
