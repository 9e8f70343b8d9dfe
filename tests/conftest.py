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
