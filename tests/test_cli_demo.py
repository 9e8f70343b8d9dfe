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
