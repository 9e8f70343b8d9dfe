import os
import shutil
import tempfile

import pytest


class FakeClock:
    """An injected monotonic clock: tests advance it instead of sleeping."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


# ---------------------------------------------------------------- PQC_REQUIRE_GPU
# On a GPU host a missing CuPy or CUDA would skip every GPU test and still exit 0. With
# PQC_REQUIRE_GPU=1 (set by benchmarks/run_gpu_checks.sh) a skipped test marked ``gpu`` fails instead.

def _gpu_required() -> bool:
    import os

    return os.environ.get("PQC_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and item.get_closest_marker("gpu") is not None and _gpu_required():
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        rep.outcome = "failed"
        rep.longrepr = f"PQC_REQUIRE_GPU=1: GPU test skipped ({reason})"


# ---------------------------------------------------------------- the user's home stays untouched
# Signing-key files (default_key_dir) and the native build cache default to the user's home. Every test
# runs with HOME and the XDG folders in a temporary folder; at the end the real key folder is compared
# with what it held before, and a test run that wrote there fails.
_REAL_HOME = os.path.expanduser("~")
_REAL_KEYS = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(_REAL_HOME, ".config"),
                          "pqc_kv_cache", "keys")


def _listing(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="pqc_kv_cache_test_home_")
    config._pqc_test_home = home
    config._pqc_real_keys_before = _listing(_REAL_KEYS)
    os.environ["HOME"] = home
    os.environ["XDG_CONFIG_HOME"] = os.path.join(home, ".config")
    os.environ["XDG_CACHE_HOME"] = os.path.join(home, ".cache")
    os.environ.pop("PQC_KV_CACHE_KEY_DIR", None)


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_pqc_real_keys_before", None)
    if before is None:
        return
    added = _listing(_REAL_KEYS) - before
    if added:
        session.config.get_terminal_writer().line(
            f"the test run wrote into the user's key folder {_REAL_KEYS}: {sorted(added)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    home = getattr(config, "_pqc_test_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
