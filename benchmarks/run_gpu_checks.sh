#!/usr/bin/env bash
# The GPU checks, as one script for a GPU host: the gpu-marked tests, then the GPU suite.
#
# A host without `cryptography` (the lent device machine) gets it from wheels carried in .whl/
# (see docs/cuda.md); results go to $OUT (the device tool's folder) or bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import cryptography.hazmat.primitives.asymmetric.mlkem" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
    export PYTHONPATH="$PWD/.site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
out="${OUT:-bench-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_audit_cuda.py 2>&1 | tee "$out/gpu_tests.txt" | tail -40 || status=1
python3 benchmarks/gpu_suite.py --out "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.txt" || status=1
exit $status
