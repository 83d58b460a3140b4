#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/fuzz_*.cpp, cmake/Fuzz.cmake) with clang + ASan + UBSan in
# build-fuzz/ (CPU only) and runs each for SECONDS (default 30) from its committed seed corpus
# fuzz/corpus/<target>/ (new inputs go to build-fuzz/corpus/<target>/, the committed seeds stay
# as they are). A crash, leak, timeout, out-of-memory or sanitizer report fails the script; the
# reproducer is left in build-fuzz/artifacts/. Prints one line per target with its executions.
#   bash tools/fuzz.sh [SECONDS] [TARGET...]      e.g. bash tools/fuzz.sh 600 fuzz_safetensors
# Needs clang and libclang-rt-dev (Debian); installs them with apt-get when they are missing.
# FUZZ_SKIP_BUILD=1 runs the targets already in build-fuzz/ as they are (long runs while the tree changes).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-30}"
shift || true
BUILD="${FUZZ_BUILD_DIR:-build-fuzz}"
CLANGXX="${CLANGXX:-clang++}"
if ! command -v "$CLANGXX" >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "fuzz: installing clang and libclang-rt-dev"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends clang libclang-rt-dev >/dev/null
fi
if [[ "${FUZZ_SKIP_BUILD:-0}" == 1 ]]; then
  :
elif [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CLANGXX" \
    -DDEEPLORA_CUDA=OFF -DDEEPLORA_MPI=OFF -DDEEPLORA_FUZZ=ON >/dev/null
fi
[[ "${FUZZ_SKIP_BUILD:-0}" == 1 ]] || cmake --build "$BUILD" -j "${JOBS:-$(nproc)}" --target fuzz
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
  for f in fuzz/fuzz_*.cpp; do TARGETS+=("$(basename "$f" .cpp)"); done
fi
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$BUILD/artifacts"
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$BUILD/corpus/$t"
  log="$BUILD/$t.log"
  # -rss_limit_mb / -malloc_limit_mb: a small input that asks for gigabytes is a finding too.
  if "$BUILD/$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
       -max_len=65536 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/$t-" \
       "$BUILD/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1; then
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    corpus=$(ls "$BUILD/corpus/$t" | wc -l)
    echo "fuzz: $t: ok, $execs executions in ${SECONDS_PER_TARGET} s (corpus $corpus new inputs)"
  else
    echo "fuzz: $t: FAILED (log $log, reproducer in $BUILD/artifacts/):"
    grep -E "ERROR|SUMMARY|==[0-9]+==" "$log" | head -20
    status=1
  fi
done
exit $status
