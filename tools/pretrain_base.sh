#!/usr/bin/env bash
# Pretrains a base model for the few-shot study with `train`, on the English corpus that
# tools/setup_study_data.sh builds from Debian packages (its val/test texts excluded):
#   bash tools/pretrain_base.sh small   # 6 layers x 384, 256 positions (GPU)
#   bash tools/pretrain_base.sh gpt2    # GPT-2 124M shape, 1024 positions (GPU)
#   bash tools/pretrain_base.sh tiny    # 2 x 64 on the tiny corpus, f32 on the CPU (a few minutes)
# Output: out/base-<name>/final (an HF directory with the tokenizer) and out/base-<name>/summary.json
# (val loss). A base already there is reused; FORCE=1 trains it again. Extra arguments go to train
# (not those set here). STEPS=N changes the number of steps; BUILD=dir picks the build directory;
# PREPARE_ONLY=1 only tokenizes the corpus into data/shards/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}  # where train and tokenize are
name=${1:?usage: pretrain_base.sh small|gpt2|tiny [train flags...]}
shift
out=out/base-$name
if [[ -z "${FORCE:-}" && -f $out/final/model.safetensors && -f $out/summary.json ]]; then
  echo "pretrain_base: $out exists (FORCE=1 to train it again)"
  exit 0
fi
corpus=data/corpus/base
[[ $name == tiny ]] && corpus=data/corpus/base-tiny
shards=data/shards/$(basename "$corpus")
# Every corpus file gives its own train and val shards, so validation covers every source.
if [[ ! -f $shards/.done ]]; then
  compgen -G "$corpus/*.txt" >/dev/null || { echo "pretrain_base: no $corpus/*.txt; run tools/setup_study_data.sh" >&2; exit 1; }
  mkdir -p "$shards"
  for f in "$corpus"/*.txt; do
    "$BUILD"/tokenize --vocab data/gpt2/vocab.json --merges data/gpt2/merges.txt --out-dir "$shards" \
      --name "$(basename "$f" .txt)" --val-fraction 0.02 "$f" >/dev/null
  done
  touch "$shards/.done"
fi
# PREPARE_ONLY=1: tokenize and stop (the GPU machine gets data/shards/<corpus> carried, not the corpus).
[[ -n "${PREPARE_ONLY:-}" ]] && { echo "pretrain_base: $shards ready ($(du -sh "$shards" | cut -f1))"; exit 0; }
case $name in
  small) args=(--n-layer 6 --n-head 6 --n-embd 384 --n-positions 256 --batch 64 --seq-len 256 --steps ${STEPS:-3000}
               --lr 1.5e-3 --warmup 200 --weight-decay 0.1 --dtype bf16 --eval-every 500 --eval-batches 20) ;;
  gpt2)  args=(--batch 32 --seq-len 512 --steps ${STEPS:-3000} --lr 6e-4 --warmup 300 --weight-decay 0.1
               --dtype bf16 --eval-every 500 --eval-batches 20) ;;
  tiny)  args=(--n-layer 2 --n-head 2 --n-embd 64 --n-positions 128 --batch 8 --seq-len 64 --steps ${STEPS:-120} --lr 3e-3
               --warmup 10 --dtype f32 --device cpu --eval-every 0 --eval-batches 4 --log-every 20) ;;
  *) echo "pretrain_base: unknown base '$name' (small, gpt2 or tiny)" >&2; exit 2 ;;
esac
rm -rf "$out"
"$BUILD"/train --preset gpt2 "${args[@]}" --data "$shards"/*_train_*.bin --val-data "$shards"/*_val_*.bin \
  --sample-tokens 24 --out "$out" "$@"
