#!/usr/bin/env bash
# The GPU checks as one command for a GPU host, each step under a time limit (about 8.5 minutes in all):
#
#   0. commit            the commit id: `git rev-parse HEAD`, or the .commit-id file written into the tree
#                        before it was copied to the GPU host (a copy without .git), and a sha256 digest
#                        of the sources (pqc_kv_cache, kernels, benchmarks, tests); saved as commit.txt
#   1. wheels    (30 s)  cryptography/cffi/pycparser from .whl/ (`make gpu-wheels`) when the host lacks them;
#                        stops if ML-KEM / ML-DSA still do not import
#   2. preflight (90 s)  versions, nvidia-smi, cupy.show_config(), a trivial RawKernel; retried with
#                        CUDA_PATH at the pip-installed CUDA, every attempt within the step's limit
#                        (--budget 80, at most 25 s per attempt, none past the budget); stops if no kernel
#                        can run
#   3. tests    (100 s)  the `gpu`-marked tests (-m gpu) of tests/backends/test_cuda_backend.py,
#                        tests/backends/test_contract.py, tests/backends/test_rows_seal.py, test_rows_seal_copy.py,
#                        tests/backends/test_rows_open.py, tests/vllm/test_blocks.py,
#                        tests/audit/test_audit_cuda.py and the static cache's tests/cache/test_static_cuda_graph.py
#                        and tests/cache/test_static_cuda_seal_gpu.py, verbose, with PQC_REQUIRE_GPU=1 (a skipped GPU
#                        test fails) and a faulthandler dump of every thread after 60 s in one test; every
#                        audit flush in those tests has a timeout
#   4. host      (60 s)  benchmarks/host_overhead.py: host and GPU milliseconds per layer update against
#                        DynamicCache (4K context, batch 8, 8 KV heads x 128 bf16)
#   5. suite    (210 s)  benchmarks/gpu_suite.py --budget 180: environment, correctness, kernels, decode (4
#                        layers, 1K and 4K), audit, decode_32_layers (32 layers, 4K); JSON and markdown
#                        rewritten after every section and after every decode variant's run
#
# Results go to $OUT or bench-results/, eight files at most: commit.txt, preflight.txt, gpu_tests.txt,
# host_overhead.json / .txt, gpu_suite.json / .md / .txt (the preflight's environment file is kept out of
# it). Exit status: 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PQC_REQUIRE_GPU=1
wheels="${PQC_WHEELS:-.whl}"      # where `make gpu-wheels` put them
status=0
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "commit"
if git rev-parse HEAD >/dev/null 2>&1; then
    git rev-parse HEAD > "$out/commit.txt"
elif [ -s .commit-id ]; then
    cp .commit-id "$out/commit.txt"
else
    echo "unknown (no .git and no .commit-id: run 'git rev-parse HEAD > .commit-id' before copying the tree)" \
        > "$out/commit.txt"
fi
# a digest of the sources as they are here, to tell a stale .commit-id from the tree that ran (the same
# command in a checkout of that commit gives the same digest)
( find pqc_kv_cache kernels benchmarks tests -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
      -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \) -not -path '*/__pycache__/*' | LC_ALL=C sort \
      | xargs sha256sum | sha256sum | cut -d' ' -f1 | sed 's/^/sources sha256 /' ) >> "$out/commit.txt"
echo "commit: $(cat "$out/commit.txt")"

step "wheels"
if ! python3 -c "import cryptography.hazmat.primitives.asymmetric.mlkem" 2>/dev/null; then
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        timeout 30 python3 -m pip install -q --no-index --no-deps --target .site "$wheels"/*.whl
        export PYTHONPATH="$PWD/.site:$PYTHONPATH"
    else
        echo "no usable cryptography here and no wheels in $wheels/ (run 'make gpu-wheels' on a networked machine)"
    fi
fi
if ! timeout 30 python3 -c "
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
mlkem.MLKEM768PrivateKey.generate(); mldsa.MLDSA65PrivateKey.generate()
import cryptography; print('cryptography', cryptography.__version__, 'ML-KEM-768 and ML-DSA-65: ok')
"; then
    echo "FATAL: ML-KEM-768 / ML-DSA-65 are not importable: the package cannot run here (see docs/cuda.md)"
    exit 3
fi

step "preflight"
envdir="$(mktemp -d)"
trap 'rm -rf "$envdir"' EXIT
if ! timeout 90 python3 benchmarks/gpu_preflight.py --env-file "$envdir/preflight.env" --probe-timeout 25 --budget 80 \
        2>&1 | tee "$out/preflight.txt"; then
    echo "FATAL: no CUDA kernel can be compiled and run here (see $out/preflight.txt)"
    exit 4
fi
# shellcheck disable=SC1091
. "$envdir/preflight.env"

step "tests"
timeout 100 python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs -o faulthandler_timeout=60 \
    tests/backends/test_cuda_backend.py tests/backends/test_contract.py tests/backends/test_rows_seal.py \
    tests/backends/test_rows_seal_copy.py \
    tests/backends/test_rows_open.py tests/vllm/test_blocks.py \
    tests/audit/test_audit_cuda.py tests/cache/test_static_cuda_graph.py tests/cache/test_static_cuda_seal_gpu.py \
    2>&1 | tee "$out/gpu_tests.txt" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU tests: FAILED"; status=1; }

step "host"
timeout 60 python3 benchmarks/host_overhead.py --steps 20 --repeats 3 --out "$out/host_overhead.json" \
    2>&1 | tee "$out/host_overhead.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "host overhead: FAILED"; status=1; }

step "suite"
timeout 210 python3 benchmarks/gpu_suite.py --budget 180 --out "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU suite: FAILED (sections finished so far are in $out/gpu_suite.json)"; status=1; }

step "done: status $status"
exit $status
