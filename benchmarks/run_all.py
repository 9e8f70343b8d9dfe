"""Run every CPU benchmark report (each measures its baseline in the same run) and keep the JSON."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pqc_kv_cache.bench import run_bench  # noqa: E402

if __name__ == "__main__":
    os.makedirs("bench-results", exist_ok=True)
    sys.exit(run_bench(quick="--quick" in sys.argv, out=os.path.join("bench-results", "cpu.json")))
