#!/usr/bin/env bash
# The main job, the mission end to end on the default data, on a fresh machine:
#   1. set up: Debian packages, GPT-2's vocabulary, classification tasks and an English corpus built
#      from Debian packages (tools/setup_study_data.sh);
#   2. build: with CUDA when a GPU is present, the CPU part alone otherwise;
#   3. pretrain a small base model on the corpus (reused when present);
#   4. fine-tune LoRA and compressed Deep LoRA (the paper's gamma = 0.01 and train's default gamma = 1) on one task (WordNet glosses -> 12 categories) at
#      n = 16 and 64 training examples, 3 seeds each, learning rates picked on the validation split;
#   5. score the test split, print a comparison table and write out/quickstart/acc_vs_n.png.
# GPU: the 6 x 384 base and the full task. CPU: a 2 x 64 base pretrained for a minute and the tiny
# splits, so the whole job stays within a few minutes on 2 cores (its numbers show the pipeline
# working, not what the method can do: docs/fewshot/report.md has the study).
# Extra arguments go to tools/study (e.g. --seeds 5).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
SKIP_BUILD=1 bash tools/setup.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1 build=build
  cmake --preset release >/dev/null
  cmake --build "$build" -j "${JOBS:-$(nproc)}" --target train study tokenize eval >/dev/null
else
  gpu=0 build=build-cpu  # a machine without a GPU compiles no CUDA kernels it cannot run
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEEPLORA_CUDA=OFF >/dev/null
  cmake --build "$build" -j "${JOBS:-$(nproc)}" --target train study tokenize eval >/dev/null
fi
echo "quickstart: built in $((SECONDS - t0)) s ($([[ $gpu == 1 ]] && echo "CUDA" || echo "CPU only") in $build/)"
t1=$SECONDS
if [[ $gpu == 1 ]]; then
  BUILD=$build bash tools/pretrain_base.sh small --quiet
  base=out/base-small/final task=data/tasks/wordnet_lexname
  lora_lr='[1e-3, 3e-3]' dl_lr='[1e-2, 3e-2]' dl1_lr='[1e-3, 3e-3]' steps='"min_steps": 50, "max_steps": 100'
else
  STEPS=40 BUILD=$build bash tools/pretrain_base.sh tiny --quiet
  base=out/base-tiny/final task=data/tasks-tiny/wordnet_lexname
  lora_lr='[3e-3]' dl_lr='[3e-2]' dl1_lr='[3e-3]' steps='"min_steps": 8, "max_steps": 8'
fi
out=out/quickstart
rm -rf "$out"
mkdir -p "$out"
cat > "$out/grid.json" <<EOF
{"base": "$base", "tasks": ["$task"], "n": [16, 64], "seeds": 3, "rank": 8, $steps,
 "methods": [{"like": "lora", "lr": $lora_lr, "rank_sweep": false},
             {"like": "deeplora", "lr": $dl_lr, "rank_sweep": false},
             {"like": "deeplora", "variant": "gamma=1", "outer_lr_scale": 1, "lr": $dl1_lr, "rank_sweep": false}]}
EOF
"$build/study" --grid "$out/grid.json" --out "$out" --quiet "$@"
/usr/bin/python3 tools/study_report.py "$out" >/dev/null
/usr/bin/python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
sel = [json.loads(l) for l in open(f"{out}/selection.jsonl")]
study = json.load(open(f"{out}/study.json"))
task = study["tasks"][0]
ns = sorted({s["n"] for s in sel})
print(f"\nquickstart: {task['name']} ({task['classes']} classes, chance {100 / task['classes']:.1f}%), "
      f"test accuracy in %, mean ± std over {sel[0]['seeds']} seeds, lr picked on validation")
print("| method | " + " | ".join(f"n={n}" for n in ns) + " |")
print("|---|" + "---|" * len(ns))
label = lambda s: s["method"] + (f"[{s['variant']}]" if s.get("variant") else "")
for m in sorted(dict.fromkeys(label(s) for s in sel), key=lambda m: (not m.startswith("lora"), m)):
    cells = {s["n"]: s for s in sel if label(s) == m}
    print(f"| {m} | " + " | ".join(f"{100 * cells[n]['test_acc_mean']:.1f} ± {100 * cells[n]['test_acc_std']:.1f} (lr {cells[n]['lr']:g})"
                                   for n in ns) + " |")
print(f"\nwrote {out}/report.md and {out}/acc_vs_n.png ({study['runs_done']} fine-tunes, "
      f"{study['seconds_total']:.0f} s)")
PY
echo "quickstart: done in $((SECONDS - t0)) s ($((SECONDS - t1)) s after the build)"
