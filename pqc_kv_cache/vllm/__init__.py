"""vLLM integration: an encrypting, tenant-binding, auditing KV connector (see docs/vllm.md).

``pqc_kv_cache.vllm.connector`` needs vLLM (``pip install 'pqc_kv_cache[vllm]'``); the key service, the
request-field helpers here and ``pqc_kv_cache.vllm.blocks`` (the worker side's sealing and opening of vLLM's
block tensors, and the stored files) do not.
"""

from .keyservice import KeyClient, KeyService, KeyServiceError, Reservation
from .tenancy import PARAMS_KEY, request_fields, tenant_cache_salt

__all__ = ["KeyService", "KeyClient", "KeyServiceError", "Reservation", "request_fields", "tenant_cache_salt",
           "PARAMS_KEY", "CONNECTOR_NAME", "CONNECTOR_MODULE", "kv_transfer_config"]

CONNECTOR_NAME = "PQCKVConnector"
CONNECTOR_MODULE = "pqc_kv_cache.vllm.connector"


def kv_transfer_config(storage_path: str, key_service: str, audit_log: str, *,
                       load_failure_policy: str = "recompute") -> dict:
    """The ``kv_transfer_config`` that loads the connector (paths only; no key material)."""
    if load_failure_policy not in ("recompute", "fail"):
        raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": load_failure_policy,
            "kv_connector_extra_config": {"storage_path": storage_path, "key_service": key_service,
                                          "audit_log": audit_log}}
