"""The command line: arguments checked and explained, clear messages instead of tracebacks."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pqc_kv_cache
from pqc_kv_cache.errors import KVCacheError
from pqc_kv_cache.__main__ import build_parser, main
from pqc_kv_cache.audit import KVAuditLog, verify_log
from pqc_kv_cache.audit.keys import load_signing_key_file
from pqc_kv_cache.audit.fileformat import load_public_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_log(tmp_path):
    path = tmp_path / "small.kvlog"
    with KVAuditLog(path=path, fsync=False) as log:
        log.log_encrypt("alice", "s1", layer_idx=0, position=3)
        log.log_decrypt("alice", "s1", layer_idx=1, position=4)
    return path


def _run_module(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "pqc_kv_cache", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_verify_of_a_missing_log_names_the_log_not_its_public_key(tmp_path, capsys):
    missing = tmp_path / "nothing.kvlog"
    assert main(["audit", "verify", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"no audit log at {missing}" in err and ".pub" not in err


def test_show_of_a_missing_log_names_the_log(tmp_path, capsys):
    assert main(["audit", "show", str(tmp_path / "nothing.kvlog")]) == 2
    assert "no audit log at" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["-1", "0", "x"])
def test_show_refuses_a_limit_that_is_not_a_positive_count(small_log, capsys, bad):
    with pytest.raises(SystemExit) as ei:
        main(["audit", "show", str(small_log), "--limit", bad])
    assert ei.value.code == 2
    assert "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("option,bad", [("--layer", "-2"), ("--layer", "65535"), ("--position", "-1"),
                                        ("--position", str(2**32))])
def test_show_refuses_layers_and_positions_no_record_can_hold(small_log, capsys, option, bad):
    with pytest.raises(SystemExit) as ei:
        main(["audit", "show", str(small_log), option, bad])
    assert ei.value.code == 2
    assert option in capsys.readouterr().err


def test_show_says_when_no_record_matches(small_log, capsys):
    assert main(["audit", "show", str(small_log), "--layer", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no matching records" in out.err
    assert main(["audit", "show", str(small_log), "--layer", "3", "--json"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no matching records" in out.err


def test_show_limit_keeps_the_newest(small_log, capsys):
    assert main(["audit", "show", str(small_log), "--limit", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and '"operation": "decrypt"' in lines[0]


def test_version_is_printed_and_defined_once(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip().endswith(pqc_kv_cache.__version__)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pqc_kv_cache.__version__"}


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_argument_and_command_has_help():
    parser = build_parser("pqc-kv-cache")
    seen = 0
    for p in _all_parsers(parser):
        for action in p._actions:
            if action.dest == "help":
                continue
            seen += 1
            if action.choices and isinstance(action.choices, dict):
                helps = {a.dest: a.help for a in action._choices_actions}
                assert all(helps.get(name) for name in action.choices), (p.prog, sorted(action.choices))
            else:
                assert action.help, f"{p.prog}: {action.dest} has no help"
    assert seen > 15


def test_the_installed_script_names_itself_in_usage():
    script = Path(sys.executable).with_name("pqc-kv-cache")
    if not script.exists():
        pytest.skip("the pqc-kv-cache script is not installed in this environment")
    proc = subprocess.run([str(script), "audit", "show", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pqc-kv-cache audit show")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"pqc-kv-cache {pqc_kv_cache.__version__}"


def test_the_module_names_itself_in_usage():
    proc = _run_module("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m pqc_kv_cache")


def test_an_installed_package_does_not_offer_bench(tmp_path):
    # an installed wheel holds the package but not benchmarks/: copy the package alone
    shutil.copytree(ROOT / "pqc_kv_cache", tmp_path / "pqc_kv_cache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = _run_module("--help", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "{demo,audit,info,vllm-store}" in proc.stdout and "bench" not in proc.stdout
    proc = _run_module("bench", "--quick", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid choice: 'bench'" in proc.stderr


def test_run_bench_outside_a_checkout_names_the_missing_scripts(monkeypatch):
    from pqc_kv_cache import bench
    monkeypatch.setattr(bench, "checkout_benchmarks", lambda: None)
    with pytest.raises(KVCacheError, match="source checkout"):
        bench.run_bench(quick=True)


def test_keygen_writes_an_owner_only_key_and_never_overwrites_it(tmp_path, capsys):
    key, pub = tmp_path / "keys" / "audit.key", tmp_path / "audit.pub.pem"
    assert main(["audit", "keygen", str(key), "--public-key", str(pub)]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    assert main(["audit", "keygen", str(key)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert key.read_bytes() == before
    # a log signed with the key verifies against the separately written public key
    log_path = tmp_path / "logs" / "a.kvlog"
    log_path.parent.mkdir()
    with KVAuditLog(path=log_path, signing_key=key, fsync=False) as log:
        log.log_encrypt("alice", "s1")
    assert verify_log(log_path, pub).ok
    assert load_public_key(pub).public_bytes_raw() == load_signing_key_file(key).public_key().public_bytes_raw()


def test_keygen_that_cannot_write_the_public_key_keeps_no_private_key(tmp_path, capsys):
    key = tmp_path / "audit.key"
    assert main(["audit", "keygen", str(key), "--public-key", str(tmp_path / "no-such-dir" / "a.pub")]) == 2
    assert "no key was kept" in capsys.readouterr().err
    assert not key.exists()
    existing = tmp_path / "taken.pub"
    existing.write_bytes(b"x")
    assert main(["audit", "keygen", str(key), "--public-key", str(existing)]) == 2
    assert not key.exists() and existing.read_bytes() == b"x"


@pytest.mark.parametrize("command", ["verify", "show"])
def test_verify_and_show_name_what_is_wrong_with_the_path_before_any_public_key(command, tmp_path, capsys):
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "audit.kvlog").write_bytes(b"")
    assert main(["audit", command, str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder} is a directory; give the audit log file itself (it holds audit.kvlog)" in err
    assert ".pub" not in err
    other = tmp_path / "notes.txt"
    other.write_text("not a log\n")
    assert main(["audit", command, str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not a pqc_kv_cache audit log (it does not start with the PQCAUDIT header)" in err
    assert ".pub" not in err
