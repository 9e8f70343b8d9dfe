"""vLLM integration: an encrypting, tenant-binding, auditing KV connector (see docs/vllm.md).

``pqc_kv_cache.vllm.connector`` needs vLLM (``pip install 'pqc-kv-cache-encryption[vllm]'``); the key service, the
server secret and request-field helpers here, its mutual TLS (``tls``, ``certs``), the gateway's session vault
(``sessionvault``), ``pqc_kv_cache.vllm.blocks`` (the worker side's sealing and
opening of vLLM's block tensors) and ``pqc_kv_cache.vllm.storefiles`` (the stored files) do not.
"""

from .keyservice import (ActiveSessions, KeyClient, KeyService, KeyServiceError, Reservation,
                         generate_engine_token_file, load_engine_token)
from .tls import MutualTLS, TLSConfigError
from .tenancy import (PARAMS_KEY, SecretFileError, ServerSecret, generate_server_secret_file, load_server_secret,
                      request_fields)

__all__ = ["MutualTLS", "TLSConfigError", "KeyService", "KeyClient", "KeyServiceError", "Reservation", "ActiveSessions",
           "generate_engine_token_file", "load_engine_token", "request_fields", "ServerSecret",
           "SecretFileError", "generate_server_secret_file", "load_server_secret", "PARAMS_KEY", "CONNECTOR_NAME",
           "CONNECTOR_MODULE", "kv_transfer_config"]

CONNECTOR_NAME = "PQCKVConnector"
CONNECTOR_MODULE = "pqc_kv_cache.vllm.connector"


def kv_transfer_config(storage_path: str, key_service: str, audit_log: str, server_secret: str, *,
                       audit_signing_key: str | None = None, key_service_token: str | None = None,
                       key_service_tls: MutualTLS | None = None,
                       load_failure_policy: str = "recompute", store_gc: dict | None = None) -> dict:
    """The ``kv_transfer_config`` that loads the connector (paths only; no key material): the store, the key
    service's socket, the worker's audit log, the server secret's key file, the audit log's signing key
    file (default: ``pqc_kv_cache.audit.keys.default_key_path(audit_log)``; created when the log is new), the
    engine token's file the worker shows the key service (when the service was started with one), and
    ``store_gc`` (``{"max_bytes": N, "max_age": S, "interval_s": T}``: the worker cleans the store up every T
    seconds, as ``python -m pqc_kv_cache vllm-store gc`` does, recording the deletions in its log).
    ``key_service`` is a socket path, or ``tls://HOST:PORT`` with ``key_service_tls`` (the worker's
    certificate files) for a key service on another host."""
    if load_failure_policy not in ("recompute", "fail"):
        raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
    extra = {"storage_path": storage_path, "key_service": key_service, "audit_log": audit_log,
             "server_secret": server_secret}
    if audit_signing_key is not None:
        extra["audit_signing_key"] = audit_signing_key
    if key_service_token is not None:
        extra["key_service_token"] = key_service_token
    if key_service_tls is not None:
        extra.update(key_service_tls_ca=key_service_tls.ca, key_service_tls_cert=key_service_tls.cert,
                     key_service_tls_key=key_service_tls.key)
    if store_gc is not None:
        extra["store_gc"] = dict(store_gc)
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": load_failure_policy, "kv_connector_extra_config": extra}
