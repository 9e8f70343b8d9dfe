"""A key service in its own process, as the gateway runs it: TCP + mutual TLS, sessions kept in a vault.

    python mtls_keyserver.py STATE_DIR CA CERT KEY TENANT...

Resumes the vault's sessions (STATE_DIR/sessions under STATE_DIR/kek), opens a session for each TENANT that
has none, listens on 127.0.0.1 (a free port) and prints one JSON line: its address and each tenant's session
id. Then it serves until a line on stdin, closes, answers with a JSON line of its counters (``refused``,
``messages``) and exits; killed instead, it leaves what a crash leaves.
"""

import json
import os
import sys

from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.resumption import generate_kek_file
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm.keyservice import KeyService
from pqc_kv_cache.vllm.sessionvault import SessionVault
from pqc_kv_cache.vllm.tls import MutualTLS


def main() -> None:
    state, ca, cert, key, *tenants = sys.argv[1:]
    kek = os.path.join(state, "kek")
    if not os.path.exists(kek):
        generate_kek_file(kek)
    vault = SessionVault(os.path.join(state, "sessions"), kek)
    manager = TenantIsolationManager()
    restored = [s.tenant_id for s in vault.restore(manager)]
    for t in tenants:
        if t not in restored:
            vault.keep(manager.create_session(TenantKeyPair.generate(t).identity()))
    with KeyService(manager, os.path.join(state, "sock"), tcp=("127.0.0.1", 0), tls=MutualTLS(ca, cert, key),
                    keep=vault.keep) as service:
        print(json.dumps({"address": service.address, "restored": restored,
                          "sessions": {t: manager.get_session(t).session_id for t in tenants}}), flush=True)
        sys.stdin.readline()
    # after close, which lets the connections being served finish: the counters are final
    print(json.dumps({"refused": service.refused, "messages": service.messages}), flush=True)


if __name__ == "__main__":
    main()
