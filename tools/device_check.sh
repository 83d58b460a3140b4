#!/usr/bin/env bash
# One call on the GPU machine: build (sm_90), run the tests (CPU-vs-CUDA included), compute-sanitizer,
# reference cross-checks, benchmarks beside their peers; logs under $OUT, a short table last.
#   bash tools/device_check.sh [build test sanitize fixture tokenizer bench train deepmc deepmc_grid deepmc_scale profile_mc
#                               peers_train peers_mc evalgen genbench pretrain llama study shapes]
# shapes: tools/shape_bench.sh (the training step at SHAPES, ours beside torch_shape_bench.py);
# evalgen: eval/generate vs transformers (makes tests/data/hf_tiny/evalgen_expected.json when missing);
# genbench: generate decode tokens/s and eval examples/s vs transformers (GPT-2 124M, bf16, same call);
# pretrain: the study's small base (tools/pretrain_base.sh small; data/shards/base carried);
# study: tools/study on STUDY_GRID (default docs/fewshot/grid.json) with --resume into
# docs/fewshot, stopping after STUDY_BUDGET seconds (default 480); the outputs come back in fewshot.tar.gz.
# Peers are read from .peers/ (a copy of ../shared/peers, carried with the call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(build test sanitize bench)
declare -A result
has() { [[ " ${stages[*]} " == *" $1 "* ]]; }
log() { pack; echo "== $*" | tee -a "$OUT/logs/summary.log"; }
# Logs are packed after every stage, so a call cut off at its time limit still returns them.
pack() { tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null; }
t0=$SECONDS

TMP=/tmp/deeplora-check; mkdir -p $TMP
if has build; then
  log "build"
  nvidia-smi -L | tee "$OUT/logs/gpu.log"
  # Debian packages the GPU machine lacks (PCRE2, CLI11) travel as .debs in .deps/ (tools/fetch_deps.sh).
  prefix=""
  if compgen -G ".deps/*.deb" >/dev/null; then
    for f in .deps/*.deb; do dpkg -x "$f" .deps/root; done
    prefix="-DCMAKE_PREFIX_PATH=$PWD/.deps/root/usr -DPCRE2_ROOT=$PWD/.deps/root/usr"
  fi
  { cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEEPLORA_CUDA_ARCH=90 $prefix \
      && cmake --build build -j "$(nproc)" ${BUILD_TARGETS:+--target $BUILD_TARGETS}; } > "$OUT/logs/build.log" 2>&1
  result[build]=$([[ $? -eq 0 ]] && echo ok || echo FAILED)
  grep -E "error|warning|Error" "$OUT/logs/build.log" | head -30
  if [[ ${result[build]} != ok ]]; then tail -30 "$OUT/logs/build.log"; tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs; exit 1; fi
fi

if has test; then
  log "tests"
  # TEST_FILTER: a doctest -tc pattern (e.g. '*deep_mc*,*sparse*') to run a subset. Other knobs:
  # TEST_EXCLUDE (a -tce pattern: cases to skip), BUILD_TARGETS (build only these), DEEPMC_METHODS (the deepmc stage's methods; default both).
  (cd build && ./deeplora_tests --duration=false ${TEST_FILTER:+-tc="$TEST_FILTER"} ${TEST_EXCLUDE:+-tce="$TEST_EXCLUDE"}) > "$OUT/logs/test.log" 2>&1
  result[test]=$(grep -E "^\[doctest\] (test cases|assertions)" "$OUT/logs/test.log" | tr -s ' ' | paste -sd' ')
  grep -B2 -A8 "ERROR" "$OUT/logs/test.log" | head -60
fi


if has fixture; then
  log "transformers fixture + logits round trip"
  # The committed fixture (tests/data/hf_tiny) is remade only when missing (same seeds, same files).
  if [[ ! -f tests/data/hf_tiny/expected.safetensors ]]; then
    python3 tools/hf_crosscheck.py fixture "$OUT/hf_tiny" > "$OUT/logs/fixture.log" 2>&1
    mkdir -p tests/data/hf_tiny && cp "$OUT"/hf_tiny/{config.json,model.safetensors,expected.safetensors} tests/data/hf_tiny/
  fi
  ./build/deeplora_tests -tc='*fixture*' --duration=false >> "$OUT/logs/fixture.log" 2>&1
  result[fixture]=$(grep -E "^\[doctest\] assertions" "$OUT/logs/fixture.log" | tr -s ' ')
  # A transformers model trains 100 steps in deeplora, is saved, and loads back in transformers.
  python3 - "$OUT" >> "$OUT/logs/fixture.log" 2>&1 <<'PY'
import sys, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
toks = rng.integers(0, 64, 20000).astype(np.uint16)
hdr = np.zeros(256, np.int32); hdr[0] = 20240520; hdr[1] = 1; hdr[2] = len(toks)
with open("/tmp/deeplora-check/tiny.bin", "wb") as f: f.write(hdr.tobytes()); f.write(toks.tobytes())
PY
  ./build/train --model tests/data/hf_tiny --data $TMP/tiny.bin --vocab-dir none --batch 8 --seq-len 32 --steps 100 \
    --lr 1e-3 --dtype f32 --device cuda --out $TMP/hf_ft --log-every 25 >> "$OUT/logs/fixture.log" 2>&1
  ./build/gpt_logits --model $TMP/hf_ft/final --ids tests/data/hf_tiny/expected.safetensors --out $TMP/ours.safetensors \
    --device cuda >> "$OUT/logs/fixture.log" 2>&1
  python3 tools/hf_crosscheck.py logits $TMP/hf_ft/final tests/data/hf_tiny/expected.safetensors $TMP/hf.safetensors >> "$OUT/logs/fixture.log" 2>&1
  python3 tools/hf_crosscheck.py compare $TMP/ours.safetensors $TMP/hf.safetensors logits 1e-3 | tee -a "$OUT/logs/fixture.log"
  result[roundtrip]=$(grep '"compare"' "$OUT/logs/fixture.log" | tail -1 | sed 's/.*rel_err": \([^,]*\).*ok": \(.*\)}/rel_err \1 ok \2/')
fi

if has peft; then
  log "LoRA vs PEFT: fixture (forward + gradients, checked in CI) and export -> PeftModel.from_pretrained"
  [[ -f $TMP/tiny.bin ]] || python3 -c "
import numpy as np
t = np.random.default_rng(0).integers(0, 64, 20000).astype(np.uint16)
h = np.zeros(256, np.int32); h[0]=20240520; h[1]=1; h[2]=len(t)
open('$TMP/tiny.bin','wb').write(h.tobytes()+t.tobytes())"
  if [[ ! -f tests/data/peft_tiny/expected.safetensors ]]; then
    python3 tools/hf_crosscheck.py peft_fixture tests/data/hf_tiny "$OUT/peft_tiny" > "$OUT/logs/peft.log" 2>&1
    mkdir -p tests/data/peft_tiny && cp -r "$OUT/peft_tiny/adapter" "$OUT/peft_tiny/expected.safetensors" tests/data/peft_tiny/
  fi
  ./build/deeplora_tests -tc='*PEFT*' --duration=false >> "$OUT/logs/peft.log" 2>&1
  result[peft_fixture]=$(grep -E "^\[doctest\] assertions" "$OUT/logs/peft.log" | tr -s ' ')
  ./build/train --model tests/data/hf_tiny --data $TMP/tiny.bin --vocab-dir none --batch 8 --seq-len 32 --steps 30 \
    --adapter lora --rank 4 --alpha 8 --lr 1e-2 --dtype f32 --device cuda --out $TMP/lora_ft --log-every 10 >> "$OUT/logs/peft.log" 2>&1
  ./build/gpt_logits --model $TMP/lora_ft/final --ids tests/data/hf_tiny/expected.safetensors --out $TMP/lora_ours.safetensors \
    --device cuda >> "$OUT/logs/peft.log" 2>&1
  python3 tools/hf_crosscheck.py peft_logits tests/data/hf_tiny $TMP/lora_ft/adapter tests/data/hf_tiny/expected.safetensors \
    $TMP/lora_peft.safetensors >> "$OUT/logs/peft.log" 2>&1
  python3 tools/hf_crosscheck.py compare $TMP/lora_ours.safetensors $TMP/lora_peft.safetensors logits 1e-4 | tee -a "$OUT/logs/peft.log"
  result[peft_export]=$(grep '"compare"' "$OUT/logs/peft.log" | tail -1 | sed 's/.*rel_err": \([^,]*\).*ok": \(.*\)}/rel_err \1 ok \2/')
  tar -czf "$OUT/peft_tiny.tar.gz" -C tests/data peft_tiny
fi

if has tokenizer; then
  log "tokenizer vs GPT2TokenizerFast"
  ./build/tokenize --vocab data/gpt2/vocab.json --merges data/gpt2/merges.txt --out-dir $TMP/tok \
    --val-fraction 0 .peers/text.txt > "$OUT/logs/tokenizer.log" 2>&1
  python3 tools/hf_crosscheck.py tokenizer data/gpt2 .peers/text.txt "$(ls $TMP/tok/*train*.bin | head -1)" | tee -a "$OUT/logs/tokenizer.log"
  result[tokenizer]=$(grep '"identical"' "$OUT/logs/tokenizer.log" | sed 's/.*"bytes": \([0-9]*\).*"identical": \([a-z]*\).*/\1 bytes identical=\2/')
fi

if has bench; then
  log "kernel bench"
  ./build/bench > "$OUT/logs/bench.log" 2>&1
  result[bench]="see logs/bench.log"
  cat "$OUT/logs/bench.log" | tail -40
fi

if has train; then
  log "train GPT-2 124M B=32 T=1024 bf16 (ours)"
  python3 -c "
import numpy as np
t = np.random.default_rng(0).integers(0, 50257, 32*1025*24).astype(np.uint16)
h = np.zeros(256, np.int32); h[0]=20240520; h[1]=1; h[2]=len(t)
open('$TMP/gpt2.bin','wb').write(h.tobytes()+t.tobytes())"
  for mode in ${TRAIN_MODES:-full lora deeplora}; do
    extra=""
    [[ $mode != full ]] && extra="--adapter $mode --rank 8"
    ./build/train --preset gpt2 --data $TMP/gpt2.bin --vocab-dir none --batch 32 --seq-len 1024 --steps 12 \
      --val-fraction 0 --dtype bf16 --device cuda --out $TMP/train_$mode --log-every 1 $extra > "$OUT/logs/train_$mode.log" 2>&1
    result[train_$mode]=$(grep "^done" "$OUT/logs/train_$mode.log" | sed 's/.*, \([0-9.]*K tok\/s\).*/\1/')
    [[ $mode == deeplora ]] && result[train_deeplora_init]=$(grep -iE "svd" "$OUT/logs/train_$mode.log" | head -1 | cut -c1-150)
    tail -4 "$OUT/logs/train_$mode.log"
  done
fi

if has shapes; then
  # The training step at small and large shapes, ours (graph on / off) beside the torch peer (same run):
  # tools/shape_bench.sh; SHAPES, METHODS, PEER_MODES, STEPS pass through.
  log "shape bench: ${SHAPES:-default shapes}"
  rm -rf "$TMP/shapes"
  bash tools/shape_bench.sh "$TMP/shapes" > "$OUT/logs/shapes.log" 2>&1
  mkdir -p "$OUT/logs/shapes" && cp "$TMP"/shapes/*.jsonl "$TMP"/shapes/*.log "$TMP"/shapes/*.err "$OUT/logs/shapes/" 2>/dev/null
  result[shapes]="see logs/shapes.log (table at its end) and logs/shapes/shape_bench.jsonl"
  sed -n '/^shape /,$p' "$OUT/logs/shapes.log"
fi

if has dist; then
  log "data parallel (needs 2 GPUs): NCCL equality test, then tokens/s on 1 vs 2 GPUs at the same per-GPU batch"
  ./build/deeplora_tests -tc='*dist*' --duration=false > "$OUT/logs/dist_test.log" 2>&1
  result[dist_test]=$(grep -E "^\[doctest\] (test cases|assertions)" "$OUT/logs/dist_test.log" | tr -s ' ' | paste -sd' ')
  grep -E "MESSAGE|ERROR" "$OUT/logs/dist_test.log" | head -20
  [[ -f $TMP/gpt2.bin ]] || python3 -c "
import numpy as np
t = np.random.default_rng(0).integers(0, 50257, 64*1025*14).astype(np.uint16)
h = np.zeros(256, np.int32); h[0]=20240520; h[1]=1; h[2]=len(t)
open('$TMP/gpt2.bin','wb').write(h.tobytes()+t.tobytes())"
  for mode in ${TRAIN_MODES:-full lora deeplora}; do
    extra=""
    [[ $mode != full ]] && extra="--adapter $mode --rank 8"
    args="--preset gpt2 --data $TMP/gpt2.bin --vocab-dir none --batch 32 --seq-len 1024 --steps 12 --val-fraction 0 --dtype bf16 --device cuda --log-every 4 $extra"
    ./build/train $args --out $TMP/dp1_$mode > "$OUT/logs/dp1_$mode.log" 2>&1
    mpirun -np 2 --bind-to none --allow-run-as-root -x NCCL_NVLS_ENABLE=0 ./build/train $args --out $TMP/dp2_$mode > "$OUT/logs/dp2_$mode.log" 2>&1
    a=$(grep "^done" "$OUT/logs/dp1_$mode.log" | sed 's/.*, \([0-9.]*\)K tok\/s.*/\1/'); b=$(grep "^done" "$OUT/logs/dp2_$mode.log" | sed 's/.*, \([0-9.]*\)K tok\/s.*/\1/')
    result[dp_$mode]="1 GPU ${a}K, 2 GPUs ${b}K tok/s, ratio $(python3 -c "print(round($b/$a,3))" 2>/dev/null)"
    tail -2 "$OUT/logs/dp2_$mode.log"
  done
fi

if has peers_train; then
  log "peer: torch_gpt2_bench.py ${PEER_TRAIN:-full_compile}"
  python3 .peers/torch_gpt2_bench.py ${PEER_TRAIN:-full_compile} > "$OUT/logs/peer_train.log" 2>&1
  result[peer_train]=$(grep tok_s "$OUT/logs/peer_train.log" | sed 's/.*"name": "\([a-z_]*\)".*"tok_s": \([0-9]*\).*/\1 \2 tok\/s/' | paste -sd';')
  for mode in ${TRAIN_MODES:-full lora deeplora}; do
    [[ -f "$OUT/logs/train_$mode.log" ]] && result[train_$mode]="${result[train_$mode]:-$(grep "^done" "$OUT/logs/train_$mode.log" | sed 's/.*, \([0-9.]*K tok\/s\).*/\1/')}"
  done
  tail -3 "$OUT/logs/peer_train.log"
fi

if has deepmc; then
  log "deep matrix completion (ours): the authors' setting, graph capture on and off"
  COMMON="--d 1000 --r 5 --p 0.2 --L 3 --eps 1e-3 --lr 5e3 --gamma 0.01 --iters 20000 --dtype f64 --device cuda"
  for m in ${DEEPMC_METHODS:-compressed original}; do
    for g in on off; do
      ./build/deep_mc $COMMON --method $m --graph $g --log-every 5000 $([[ $g == on ]] && echo "--csv $OUT/mc_$m.csv") \
        > "$OUT/logs/deepmc_${m}_$g.log" 2>&1
      result[deepmc_${m}_graph_$g]=$(tail -1 "$OUT/logs/deepmc_${m}_$g.log" | python3 -c "import json,sys; r=json.loads(sys.stdin.read())['runs'][0]; print(f\"{r['seconds']:.3f} s, {r['us_per_iter']:.1f} us/iter, recovery {r['recovery']:.2e}\")" 2>/dev/null)
    done
  done
fi

if has deepmc_scale; then
  log "deep matrix completion, compressed, at scale (200 observations per row, as d=1000 p=0.2; --lr auto)"
  for spec in "10000 40000" "100000 40000"; do
    set -- $spec
    ./build/deep_mc --d $1 --r 5 --obs-per-row 200 --L 3 --eps 1e-3 --lr auto --gamma 0.01 --iters $2 \
      --tol 1e-12 --method compressed --dtype f64 --device cuda --graph on --log-every 5000 > "$OUT/logs/deepmc_$1.log" 2>&1
    result[deepmc_$1]=$(tail -1 "$OUT/logs/deepmc_$1.log" | python3 -c "import json,sys; r=json.loads(sys.stdin.read())['runs'][0]; print(f\"{r['iters']} iters, {r['seconds']:.2f} s, {r['us_per_iter']:.1f} us/iter, recovery {r['recovery']:.2e} (sampled={r['recovery_estimated']})\")" 2>/dev/null)
  done
fi

if has profile_mc; then
  log "ncu: one launch of the fused compressed kernel (250 iterations, d=1000), stall samples per line"
  ncu --clock-control none -k regex:lowrank_steps -c 1 --import-source yes \
    --section SourceCounters --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SpeedOfLight -f -o "$OUT/lowrank" \
    ./build/deep_mc --d 1000 --r 5 --p 0.2 --L 3 --eps 1e-3 --lr 5e3 --gamma 0.01 --iters 250 --log-every 250 \
    --method compressed --dtype f64 --device cuda --graph off > "$OUT/logs/ncu_run.log" 2>&1
  ncu -i "$OUT/lowrank.ncu-rep" --page details > "$OUT/logs/ncu_details.txt" 2>&1
  ncu -i "$OUT/lowrank.ncu-rep" --page source --csv --print-source sass > "$OUT/logs/ncu_sass.csv" 2>&1
  ncu -i "$OUT/lowrank.ncu-rep" --page source --csv --print-source cuda > "$OUT/logs/ncu_cuda.csv" 2>&1
  result[profile_mc]=$(grep -E "^ +Duration" "$OUT/logs/ncu_details.txt" | head -1 | tr -s ' ')
fi

if has deepmc_grid; then
  log "deep matrix completion at every shape, ours beside the JAX peer on the same target (tools/deep_mc_grid.sh)"
  bash tools/deep_mc_grid.sh "$OUT/logs/deep_mc_grid" > "$OUT/logs/deep_mc_grid.md" 2> "$OUT/logs/deep_mc_grid.err"
  cp "$OUT/logs/deep_mc_grid/grid.jsonl" "$OUT/deep_mc_grid.jsonl" 2>/dev/null
  cat "$OUT/logs/deep_mc_grid.md"
  result[deepmc_grid]="$(grep -c '^| [0-9]' "$OUT/logs/deep_mc_grid.md") rows (logs/deep_mc_grid.md)"
fi

if has peers_mc; then
  log "peer: jax_deep_mc.py"
  python3 .peers/jax_deep_mc.py > "$OUT/logs/peer_mc.log" 2>&1
  result[peer_mc]=$(grep seconds "$OUT/logs/peer_mc.log" | paste -sd';')
fi

if has evalgen; then
  log "eval and generate vs transformers (tiny fixture, f32, CPU and CUDA)"
  if [[ ! -f tests/data/hf_tiny/evalgen_expected.json ]]; then
    python3 tools/hf_crosscheck.py evalgen_fixture tests/data/hf_tiny tests/data/hf_tiny/evalgen_expected.json \
      > "$OUT/logs/evalgen.log" 2>&1
  fi
  cp tests/data/hf_tiny/evalgen_expected.json "$OUT/" 2>/dev/null
  ./build/deeplora_tests -tc='*vs transformers on the committed fixture*,*generate on CUDA*' --duration=false \
    >> "$OUT/logs/evalgen.log" 2>&1
  result[evalgen]=$(grep -E "^\[doctest\] (test cases|assertions)" "$OUT/logs/evalgen.log" | tr -s ' ' | paste -sd' ')
  grep -E "MESSAGE|ERROR" "$OUT/logs/evalgen.log" | head -10
fi

if has genbench; then
  log "generate (decode tokens/s) and eval (examples/s) vs transformers: GPT-2 124M random init, bf16"
  python3 - "$TMP" <<'PY' > "$OUT/logs/genbench.log" 2>&1
import json, random, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
d = sys.argv[1]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(f"{d}/gpt2_hf", safe_serialization=True)
rng = random.Random(0)
ids = [[rng.randrange(50000) for _ in range(32)] for _ in range(16)]
json.dump(ids, open(f"{d}/ids16.json", "w")); json.dump(ids[:1], open(f"{d}/ids1.json", "w"))
PY
  for b in 1 16; do
    for g in on off; do
      ./build/generate --model $TMP/gpt2_hf --vocab-dir data/gpt2 --prompt-ids $TMP/ids$b.json --batch $b \
        --max-new-tokens 128 --no-stop --dtype bf16 --cuda-graph $g --quiet > $TMP/gen.json 2>> "$OUT/logs/genbench.log"
      ./build/generate --model $TMP/gpt2_hf --vocab-dir data/gpt2 --prompt-ids $TMP/ids$b.json --batch $b \
        --max-new-tokens 128 --no-stop --dtype bf16 --cuda-graph $g --quiet > $TMP/gen.json 2>> "$OUT/logs/genbench.log"
      tee -a "$OUT/logs/genbench.log" < $TMP/gen.json
      result[gen_b${b}_graph_$g]=$(python3 -c "import json; print(round(json.load(open('$TMP/gen.json'))['decode_tokens_per_s']))" 2>/dev/null)
    done
  done
  python3 tools/hf_bench.py gen $TMP/gpt2_hf $TMP/ids16.json 128 eager,static_compile 1,16 | tee -a "$OUT/logs/genbench.log"
  for task in wordnet_lexname; do
    ./build/eval --model $TMP/gpt2_hf --vocab-dir data/gpt2 --data data/tasks/$task/test.jsonl --dtype bf16 | tee -a "$OUT/logs/genbench.log"
    python3 tools/hf_bench.py eval $TMP/gpt2_hf data/gpt2 data/tasks/$task/test.jsonl | tee -a "$OUT/logs/genbench.log"
  done
  result[genbench]="see logs/genbench.log"
fi

if has pretrain; then
  # PRETRAIN_BASES: which bases (default small; "small gpt2" for both). Their summaries come back in $OUT.
  for b in ${PRETRAIN_BASES:-small}; do
    log "pretrain the study's $b base (tools/pretrain_base.sh $b)"
    s=$SECONDS
    bash tools/pretrain_base.sh "$b" --log-every 250 > "$OUT/logs/pretrain-$b.log" 2>&1
    result[pretrain-$b]="$((SECONDS - s)) s | $(grep -E "^eval step" "$OUT/logs/pretrain-$b.log" | tail -1 | cut -c1-80)"
    tail -3 "$OUT/logs/pretrain-$b.log"
    mkdir -p "$OUT/base-$b" && cp out/base-$b/summary.json out/base-$b/final/config.json "$OUT/base-$b/" 2>/dev/null
  done
fi

if has llama; then
  log "Llama family: transformers fixture (tests/data/llama_tiny, made when missing) and the llama cases"
  if [[ ! -f tests/data/llama_tiny/llama/expected.safetensors ]]; then
    python3 tools/hf_crosscheck.py llama_fixture tests/data/llama_tiny > "$OUT/logs/llama.log" 2>&1
  fi
  tar -czf "$OUT/llama_tiny.tar.gz" -C tests/data llama_tiny 2>/dev/null
  # tokenizer.json fixtures made by HF tokenizers (tests/data/tokenizer_json, made when missing).
  if [[ ! -f tests/data/tokenizer_json/llama3_style/expected.json ]]; then
    python3 tools/hf_crosscheck.py tokenizer_json_fixture tests/data/tokenizer_json >> "$OUT/logs/llama.log" 2>&1
  fi
  tar -czf "$OUT/tokenizer_json.tar.gz" -C tests/data tokenizer_json 2>/dev/null
  ./build/deeplora_tests -tc='llama*,*llama*,*gqa*,*rope*,*rmsnorm*,tokenizer*' --duration=false >> "$OUT/logs/llama.log" 2>&1
  result[llama]=$(grep -E "^\[doctest\] (test cases|assertions)" "$OUT/logs/llama.log" | tr -s ' ' | paste -sd' ')
  grep -B2 -A8 "ERROR" "$OUT/logs/llama.log" | head -40
fi

if has study; then
  log "few-shot study: ${STUDY_GRID:-docs/fewshot/grid.json}, budget ${STUDY_BUDGET:-480} s"
  ./build/study --grid "${STUDY_GRID:-docs/fewshot/grid.json}" --out "${STUDY_OUT:-docs/fewshot}" --resume \
    --time-budget "${STUDY_BUDGET:-480}" > "$OUT/logs/study.log" 2>&1
  result[study]="exit $? | $(tail -1 "$OUT/logs/study.log" | cut -c1-120)"
  tar -czf "$OUT/fewshot.tar.gz" -C "${STUDY_OUT:-docs/fewshot}" runs.jsonl selection.jsonl study.json
fi

if has sanitize; then
  log "compute-sanitizer memcheck (GPU test cases)"
  # SANITIZE_FILTER: a doctest -tc pattern for a subset (default: every GPU test case).
  compute-sanitizer --tool memcheck --error-exitcode 9 ./build/deeplora_tests \
    -tc="${SANITIZE_FILTER:-*CUDA*,*allocator*,*GPU*,*cuda*}" --duration=false > "$OUT/logs/sanitize.log" 2>&1
  result[sanitize]=$(grep -E "ERROR SUMMARY" "$OUT/logs/sanitize.log" | tail -1)
  tail -5 "$OUT/logs/sanitize.log"
fi

echo
echo "==================== device_check summary ($((SECONDS - t0)) s) ===================="
for k in "${!result[@]}"; do printf '%-18s %s\n' "$k" "${result[$k]}"; done | sort
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null && rm -rf "$OUT/logs"
