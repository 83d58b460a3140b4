#!/usr/bin/env bash
# The test command: builds if needed and runs every test (doctest suite through ctest, verbose so the
# per-suite counts print). GPU cases skip with a reason when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f build/build.ninja ]] || cmake --preset release >/dev/null
cmake --build build -j "${JOBS:-$(nproc)}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
ctest --test-dir build --output-on-failure -V "$@"
