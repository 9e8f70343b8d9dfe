import subprocess
import sys

from pqc_kv_cache.__main__ import build_parser, main


def test_demo_core_part_runs_and_shows_the_refusal(capsys, tmp_path):
    assert main(["demo", "--no-cache", "--audit-path", str(tmp_path / "demo.kvlog")]) == 0
    out = capsys.readouterr().out
    assert "TenantIsolationError" in out
    assert "isolation-violation" in out and "rotate" in out
    assert "tenant derives the server's key: True" in out


def test_cli_lists_demo_audit_and_bench():
    help_text = build_parser().format_help()
    for command in ("demo", "audit", "bench"):
        assert command in help_text


def test_unknown_command_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_the_demo_says_where_its_log_went(capsys, tmp_path):
    assert main(["demo", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "was in a temporary folder, removed now" in out and "--audit-path" in out
    kept = tmp_path / "demo.kvlog"
    assert main(["demo", "--no-cache", "--audit-path", str(kept)]) == 0
    assert f"audit log is kept at {kept}" in capsys.readouterr().out


def test_audit_show_fits_120_columns_and_explains_the_nonce_column(capsys, tmp_path):
    log = tmp_path / "demo.kvlog"
    assert main(["demo", "--audit-path", str(log)]) == 0
    capsys.readouterr()
    assert main(["audit", "show", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 300
    assert max(len(line) for line in lines) <= 120
    assert any(line.startswith("nonce: epoch:counter") for line in lines[:3])
    assert not any("urn:pqc-kv-sess:" in line for line in lines)   # shortened to the end of the id
