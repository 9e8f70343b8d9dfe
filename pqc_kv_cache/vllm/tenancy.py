"""The request fields a server sets so that the encrypting connector (and vLLM's prefix cache) knows the tenant.

Pure Python: importable without vLLM, so a server can build requests without importing the connector.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["tenant_cache_salt", "request_fields", "PARAMS_KEY"]

PARAMS_KEY = "pqc_kv_cache"


def tenant_cache_salt(tenant_id: str) -> str:
    """The ``cache_salt`` bound to a tenant: vLLM hashes it into its prefix-cache block hashes, so two
    tenants' identical prompts never share vLLM's blocks. The connector refuses a request of tenant T whose
    salt is not ``tenant_cache_salt(T)``."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError("tenant_id must be a non-empty str")
    return "pqckv-" + hashlib.sha256(b"pqc_kv_cache/vllm-salt\x00" + tenant_id.encode("utf-8")).hexdigest()[:32]


def request_fields(tenant_id: str, session_id: str) -> dict[str, Any]:
    """``cache_salt`` and ``kv_transfer_params`` of a tenant's request (no key material: ids only).

    Offline: ``llm.generate({"prompt_token_ids": ids, "cache_salt": f["cache_salt"]},
    SamplingParams(extra_args={"kv_transfer_params": f["kv_transfer_params"]}))``; in the OpenAI server the
    same two fields of the request body.
    """
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty str")
    return {"cache_salt": tenant_cache_salt(tenant_id),
            "kv_transfer_params": {PARAMS_KEY: {"tenant_id": tenant_id, "session_id": session_id}}}
