#!/usr/bin/env bash
# Training-step benchmark at any GPT-2 shape, ours beside the PyTorch peer in the same run (GPU machine).
#   SHAPES="L:C:H:B:T ..." METHODS="full lora deeplora" PEER_MODES="eager compile graphs" \
#     bash tools/shape_bench.sh OUTDIR
# Ours: `train` on random tokens (bf16, AdamW, rank 8 adapters on c_attn/c_proj/c_fc like the peer's
# PEFT config), with the step captured in a CUDA graph and without; the median step time of STEPS steps.
# The peer: .peers/torch_shape_bench.py (PEFT LoRA r=8; Deep LoRA has no peer, so it is compared with
# the peer's LoRA) in each PEER_MODES mode (eager, torch.compile, torch.compile reduce-overhead).
# Writes OUTDIR/shape_bench.jsonl (one row per measurement) and prints a table with the ratio of the
# best peer mode's step time to ours.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-out/shape_bench}
mkdir -p "$OUTDIR"
SHAPES=${SHAPES:-"6:384:6:16:128 12:768:12:8:256"}
METHODS=${METHODS:-"full lora deeplora"}
PEER_MODES=${PEER_MODES-"eager compile graphs"}  # empty: ours only
STEPS=${STEPS:-40}
GRAPHS=${GRAPHS:-"on off"}
rows="$OUTDIR/shape_bench.jsonl"
: > "$rows"
shard=$OUTDIR/random.bin
python3 -c "
import numpy as np
t = np.random.default_rng(0).integers(0, 50257, 4_000_000).astype(np.uint16)
h = np.zeros(256, np.int32); h[0]=20240520; h[1]=1; h[2]=len(t)
open('$shard','wb').write(h.tobytes()+t.tobytes())"
for shape in $SHAPES; do
  IFS=: read -r L C H B T <<< "$shape"
  for m in $METHODS; do
    extra=""
    [[ $m != full ]] && extra="--adapter $m --rank 8 --adapt all"
    for g in $GRAPHS; do
      log="$OUTDIR/ours_${L}x${C}_b${B}_t${T}_${m}_graph${g}.log"
      ./build/train --preset gpt2 --n-layer "$L" --n-embd "$C" --n-head "$H" --n-positions "$T" --data "$shard" \
        --vocab-dir none --batch "$B" --seq-len "$T" --steps "$STEPS" --val-fraction 0 --dtype bf16 --device cuda \
        --out '' --log-every 0 --cuda-graph "$g" $extra > "$log" 2>&1
      ms=$(grep "^done" "$log" | sed -n 's/.*step \([0-9.]*\) ms.*/\1/p')
      peak=$(grep "^done" "$log" | sed -n 's/.*GPU peak \([0-9.]*\) GiB.*/\1/p')
      nodes=$(grep "^done" "$log" | sed -n 's/.*graph of \([0-9]*\) nodes.*/\1/p')
      echo "{\"side\":\"ours\",\"L\":$L,\"C\":$C,\"B\":$B,\"T\":$T,\"method\":\"$m\",\"mode\":\"graph_$g\",\"step_ms\":${ms:-null},\"peak_gib\":${peak:-null},\"graph_nodes\":${nodes:-null}}" >> "$rows"
      echo "ours $shape $m graph=$g: ${ms:-FAILED} ms (peak ${peak:-?} GiB, ${nodes:-no} graph nodes)"
      [[ -z $ms ]] && tail -5 "$log"
    done
  done
  peer_methods=""
  for m in $METHODS; do
    pm=$([[ $m == full ]] && echo full || echo lora)
    [[ " $peer_methods " == *" $pm "* ]] || peer_methods+=" $pm"
  done
  [[ -z ${PEER_MODES// /} ]] && peer_methods=""  # ours only
  for pm in $peer_methods; do
    modes=""
    for mode in $PEER_MODES; do modes+=" ${pm}_${mode}"; done
    L=$L C=$C H=$H T=$T B=$B timeout 900 python3 .peers/torch_shape_bench.py $modes 2> "$OUTDIR/peer_${L}x${C}_b${B}_t${T}_${pm}.err" |
      while read -r line; do
        echo "$line" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read()); m, mode = r['mode'].split('_', 1)
print(json.dumps(dict(side='peer', L=r['L'], C=r['C'], B=r['B'], T=r['T'], method=m, mode=mode, step_ms=r['step_ms'], peak_gib=r['peak_gib'])))" >> "$rows"
        echo "peer $shape $line"
      done
  done
done
python3 - "$rows" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def key(r): return (r['L'], r['C'], r['B'], r['T'])
print(f"\n{'shape':<22}{'method':<10}{'ours graph':>11}{'ours eager':>11}{'best peer':>22}{'peer/ours':>10}{'ours GiB':>9}{'peer GiB':>9}{'nodes':>7}")
for k in sorted({key(r) for r in rows}):
    for m in ['full', 'lora', 'deeplora']:
        ours = {r['mode']: r for r in rows if key(r) == k and r['side'] == 'ours' and r['method'] == m}
        if not ours: continue
        pm = 'full' if m == 'full' else 'lora'
        peers = [r for r in rows if key(r) == k and r['side'] == 'peer' and r['method'] == pm and r['step_ms']]
        best = min(peers, key=lambda r: r['step_ms']) if peers else None
        g, e = ours.get('graph_on', {}).get('step_ms'), ours.get('graph_off', {}).get('step_ms')
        mine = min([x for x in (g, e) if x] or [None]) if (g or e) else None
        ratio = f"{best['step_ms'] / mine:.2f}x" if best and mine else '-'
        bp = f"{best['step_ms']:.3f} ({pm}_{best['mode']})" if best else '-'
        peak = (ours.get('graph_on') or ours.get('graph_off') or {}).get('peak_gib')
        f = lambda x: f"{x:.3f}" if x else '-'
        print(f"{'%dLx%d B%d T%d' % k:<22}{m:<10}{f(g):>11}{f(e):>11}{bp:>22}{ratio:>10}{str(peak):>9}{str(best['peak_gib'] if best else '-'):>9}{str(ours.get('graph_on', {}).get('graph_nodes') or '-'):>7}")
EOF
