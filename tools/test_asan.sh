#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer: the asan preset
# (build-asan/, gcc -O1 -g, -fsanitize=address,undefined -fno-sanitize-recover=all, CUDA off); the
# tools the CLI / dist / signal tests spawn are built the same way. Any memory error, leak or UB stops
# the binary with a report and fails the script.
#   bash tools/test_asan.sh [doctest args...]      e.g. bash tools/test_asan.sh -tc='safetensors:*'
# The dist: cases run ASan-built ranks under mpirun: OpenMPI's own allocations (made in MCA plugins it
# unloads before exit, so no suppression can name them) are reported as leaks, so those cases run with
# leak checking off (memory errors and UB still fail them); every other case checks leaks.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f build-asan/build.ninja ]] || cmake --preset asan >/dev/null
cmake --build build-asan -j "${JOBS:-$(nproc)}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0
ASAN_OPTIONS="detect_leaks=1" build-asan/deeplora_tests --duration=false -tce='dist:*' "$@" || status=1
ASAN_OPTIONS="detect_leaks=0" build-asan/deeplora_tests --duration=false -tc='dist:*' "$@" || status=1
exit $status
