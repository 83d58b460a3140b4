#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, then a short training run on the default corpus
# (Debian's fortunes texts, tokenized with GPT-2's BPE) — GPT-2 124M in bf16 on the GPU if there is
# one, a small model in f32 on the CPU otherwise. Extra arguments go to `train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec ./build/train --init gpt2 --data data/corpus/fortunes.txt --batch 8 --seq-len 256 --steps 200 \
    --lr 6e-4 --warmup 20 --eval-every 50 --ckpt-every 100 --dtype bf16 --device cuda --out out/quickstart "$@"
else
  exec ./build/train --init small-cpu --data data/corpus/fortunes.txt --batch 4 --seq-len 64 --steps 40 \
    --lr 1e-3 --warmup 4 --eval-every 20 --eval-batches 4 --ckpt-every 20 --dtype f32 --device cpu \
    --top-k 20 --out out/quickstart "$@"
fi
