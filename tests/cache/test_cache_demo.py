"""The EncryptedCache demo runs end to end and every check it prints holds."""

from __future__ import annotations

from pqc_kv_cache.audit import KVAuditLog, verify_log
from pqc_kv_cache.cache_demo import run_cache_demo


def test_cache_demo_passes_on_its_own_temporary_log():
    lines = []
    assert run_cache_demo(print_fn=lines.append) == 0
    text = "\n".join(lines)
    assert "output identical to DynamicCache: True" in text
    assert "output identical to DynamicCache: True; plaintext held while generating: True" in text
    assert "after the block: released=True, layer.keys is None" in text
    assert "caught: authentication failed for tenant 'bob'" in text
    assert "closed=True" in text and "all checks passed" in text


def test_cache_demo_records_into_a_given_log_and_leaves_it_open(tmp_path):
    path = tmp_path / "demo.kvlog"
    log = KVAuditLog(path=path, signing_key=tmp_path / "keys" / "demo.key")
    assert run_cache_demo(print_fn=lambda *_: None, audit=log) == 0
    assert len(log) > 0
    log.close()
    rep = verify_log(path)
    assert rep.ok and rep.closed and rep.records > 0


def test_cache_demo_counts_only_its_own_records_in_a_continued_log(tmp_path):
    path, key = tmp_path / "again.kvlog", tmp_path / "keys" / "again.key"
    for _ in range(2):
        lines = []
        with KVAuditLog(path=path, signing_key=key) as log:
            assert run_cache_demo(print_fn=lines.append, audit=log) == 0
        assert any("encrypt records = layers x rows x positions written" in ln and ln.endswith("True")
                   for ln in lines)
    rep = verify_log(path)
    assert rep.ok and rep.closed and rep.reopens == 1
