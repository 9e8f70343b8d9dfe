"""Fixtures shared by the cache tests: ``mode`` runs a test once per residency mode of EncryptedCache."""

from __future__ import annotations

import pytest

MODES = ["sealed", "working_set"]


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param
