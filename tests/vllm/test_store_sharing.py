"""Several engines on one store: the worker side of the connector in separate processes over one real key
service (the processes an engine's workers are), saving the same blocks at once and loading what the other
saved, tenant-bound. (tests/vllm/test_connector.py shows the same store used by two engines one after the
other.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import KeyService, ServerSecret
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes

BS = 4
SECRET = bytes(range(32))
PROMPT = list(range(50, 50 + 6 * BS))
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def _args(tmp_path, service, session, op, tenant="tenant-a", reps=1, seed=1):
    return {"op": op, "store": str(tmp_path / "store"), "socket": service.path, "secret": SECRET.hex(),
            "tenant": tenant, "session": session, "prompt": PROMPT, "block_size": BS, "seed": seed, "reps": reps}


def _start(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "support.store_worker", json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture()
def world(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    sb = manager.create_session(TenantKeyPair.generate("tenant-b").identity())
    with KeyService(manager, str(tmp_path / "keys")) as service:
        yield service, sa, sb


def test_a_prefix_stored_by_one_process_loads_in_another_and_only_for_its_tenant(world, tmp_path):
    service, sa, sb = world
    assert _result(_start(_args(tmp_path, service, sa.session_id, "save"))) == {"written": 6}
    got = _result(_start(_args(tmp_path, service, sa.session_id, "load")))
    assert got == {"errors": [[]], "equal": True}
    # tenant B's names for the same prompt are other files: nothing of A's is found under them
    secret = ServerSecret(SECRET)
    for c in chain_hashes(PROMPT, BS):
        assert not os.path.exists(block_file(str(tmp_path / "store"), secret, "tenant-b", sb.session_id, c))
    # and A's files put under B's names fail B's tags (the AAD binds tenant, session and token prefix)
    for c in chain_hashes(PROMPT, BS):
        a = block_file(str(tmp_path / "store"), secret, "tenant-a", sa.session_id, c)
        b = block_file(str(tmp_path / "store"), secret, "tenant-b", sb.session_id, c)
        os.makedirs(os.path.dirname(b), mode=0o700, exist_ok=True)
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fb.write(fa.read())
    got = _result(_start(_args(tmp_path, service, sb.session_id, "load", tenant="tenant-b")))
    assert got["errors"] == [list(range(16 - 6, 16))] and not got["equal"]


def test_processes_saving_the_same_blocks_at_once_leave_whole_files_that_always_load(world, tmp_path):
    service, sa, _ = world
    # stored once first, so that every load below finds a file; then two savers race while a third loads
    assert _result(_start(_args(tmp_path, service, sa.session_id, "save"))) == {"written": 6}
    savers = [_start(_args(tmp_path, service, sa.session_id, "save", reps=25)) for _ in range(2)]
    loader = _start(_args(tmp_path, service, sa.session_id, "load", reps=25))
    assert [_result(p) for p in savers] == [{"written": 150}, {"written": 150}]
    got = _result(loader)
    assert got["equal"] and got["errors"] == [[]] * 25
    files = [f for _, _, fs in os.walk(tmp_path / "store") for f in fs]
    assert sorted(f for f in files if f.endswith(".pkvb")) == sorted(
        os.path.basename(block_file(str(tmp_path / "store"), ServerSecret(SECRET), "tenant-a", sa.session_id, c))
        for c in chain_hashes(PROMPT, BS))
    assert not [f for f in files if f.endswith(".tmp")]  # no temporary file left behind
    assert _result(_start(_args(tmp_path, service, sa.session_id, "load"))) == {"errors": [[]], "equal": True}
