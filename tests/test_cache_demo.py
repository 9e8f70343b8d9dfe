"""The EncryptedCache demo runs end to end and every check it prints holds."""

from __future__ import annotations

from pqc_kv_cache.audit import verify_log
from pqc_kv_cache.cache_demo import run_cache_demo


def test_cache_demo_passes_and_leaves_a_verified_log_beside_the_given_path(tmp_path):
    lines = []
    assert run_cache_demo(print_fn=lines.append, audit_path=str(tmp_path / "demo.kvlog")) == 0
    text = "\n".join(lines)
    assert "output identical to DynamicCache: True" in text
    assert "caught: authentication failed for tenant 'bob'" in text
    assert "all checks passed" in text
    rep = verify_log(tmp_path / "demo-cache.kvlog")
    assert rep.ok and rep.closed and rep.records > 0


def test_cache_demo_runs_twice_on_the_same_path(tmp_path):
    path = str(tmp_path / "again.kvlog")
    assert run_cache_demo(print_fn=lambda *_: None, audit_path=path) == 0
    assert run_cache_demo(print_fn=lambda *_: None, audit_path=path) == 0
