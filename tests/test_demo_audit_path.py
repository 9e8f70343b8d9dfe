"""``demo --audit-path P`` writes its one log at P, keeps the key elsewhere, and runs again on the same P."""

from __future__ import annotations

import stat

import pytest

from pqc_kv_cache.__main__ import main
from pqc_kv_cache.audit import verify_log
from pqc_kv_cache.audit.keys import KEY_DIR_ENV, default_key_path


@pytest.fixture
def key_dir(tmp_path, monkeypatch):
    d = tmp_path / "keys"
    monkeypatch.setenv(KEY_DIR_ENV, str(d))
    return d


def test_demo_writes_the_log_at_the_given_path_and_continues_it_when_run_again(tmp_path, key_dir, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "demo.kvlog"
    assert main(["demo", "--no-cache", "--audit-path", str(path)]) == 0
    first = capsys.readouterr().out
    assert f"audit log: {path} (new)" in first
    assert sorted(p.name for p in logs.iterdir()) == ["demo.kvlog", "demo.kvlog.pub", "demo.kvlog.seal"]
    records = verify_log(path).records
    key = default_key_path(path)
    assert key.parent == key_dir and stat.S_IMODE(key.stat().st_mode) == 0o600

    assert main(["demo", "--no-cache", "--audit-path", str(path)]) == 0
    second = capsys.readouterr().out
    assert f"audit log: {path} (continued)" in second and "TenantIsolationError" in second
    assert sorted(p.name for p in logs.iterdir()) == ["demo.kvlog", "demo.kvlog.pub", "demo.kvlog.seal"]
    rep = verify_log(path)
    assert rep.ok and rep.closed and rep.reopens == 1 and rep.records == 2 * records


@pytest.mark.slow
def test_whole_demo_with_the_cache_runs_twice_on_one_log(tmp_path, key_dir, capsys):
    path = tmp_path / "demo.kvlog"
    key = tmp_path / "elsewhere" / "demo.key"
    for run in (1, 2):
        assert main(["demo", "--audit-path", str(path), "--signing-key", str(key)]) == 0, run
        out = capsys.readouterr().out
        assert "all checks passed" in out and "ok=True" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.kvlog", "demo.kvlog.pub", "demo.kvlog.seal",
                                                           "elsewhere"]
    assert not key_dir.exists()        # the given key file is used, not the default one
    assert verify_log(path).reopens == 1


def test_signing_key_without_audit_path_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["demo", "--no-cache", "--signing-key", str(tmp_path / "k.key")])
    assert ei.value.code == 2 and "--signing-key needs --audit-path" in capsys.readouterr().err


def test_demo_with_a_log_whose_key_is_lost_says_so_in_one_line(tmp_path, key_dir, capsys):
    path = tmp_path / "demo.kvlog"
    assert main(["demo", "--no-cache", "--audit-path", str(path)]) == 0
    default_key_path(path).unlink()
    capsys.readouterr()
    assert main(["demo", "--no-cache", "--audit-path", str(path)]) == 2
    err = capsys.readouterr().err
    assert "needs the key it was written with" in err and "Traceback" not in err
