#!/usr/bin/env bash
# Deep matrix completion at every shape, ours beside the JAX peer on the identical problem (GPU machine).
#   GRID_D="500 1000 2000 4000" GRID_R="5 10 20" GRID_P="0.05 0.2 0.5" ITERS=20000 \
#   METHODS="compressed original" IMPLS="auto" ORIG_MAX_D=4000 bash tools/deep_mc_grid.sh OUTDIR
# Per grid point (skipped where r >= d/2): the peer (.peers/jax_deep_mc.py, f64) builds the target and
# mask, writes them in our --target format (TARGET_OUT) and times its METHODS; then ./build/deep_mc
# solves that file with each IMPLS choice of the compressed step (auto | fused | dense | tape; a choice
# the shape does not support is recorded as skipped) and the original. Both sides use the same step
# size, lr = 5e3·(d/1000)^(4/3)·(0.2/p) (deep_mc --lr auto's rule; the authors' 5e3 at d = 1000,
# p = 0.2), L = 3, ε = 1e-3, γ = 0.01, and ITERS iterations (a multiple of 100: the peer steps in scans
# of 100). The original is run only up to d = ORIG_MAX_D. Times exclude compilation, set-up and
# evaluation on both sides. PEER=0 runs ours only (on our own generated target of the same d, r, p);
# DEVICE=cpu runs ours on the CPU (a smoke test of the script).
# Writes OUTDIR/grid.jsonl (one row per run) and prints a table: µs/iter, final recovery errors, and the
# peer's time over ours.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-out/deep_mc_grid}
mkdir -p "$OUTDIR"
GRID_D=${GRID_D:-"500 1000 2000 4000"}
GRID_R=${GRID_R:-"5 10 20"}
GRID_P=${GRID_P:-"0.05 0.2 0.5"}
ITERS=${ITERS:-20000}
METHODS=${METHODS:-"compressed original"}
IMPLS=${IMPLS:-auto}
ORIG_MAX_D=${ORIG_MAX_D:-4000}
PEER=${PEER:-1}
PEER_PY=${PEER_PY:-.peers/jax_deep_mc.py}
rows="$OUTDIR/grid.jsonl"
: > "$rows"
(( ITERS % 100 == 0 )) || { echo "deep_mc_grid: ITERS=$ITERS must be a multiple of 100 (the peer's scan length)" >&2; exit 2; }
[[ -x ./build/deep_mc ]] || { echo "deep_mc_grid: ./build/deep_mc not built" >&2; exit 2; }
[[ $PEER == 0 || -f $PEER_PY ]] || { echo "deep_mc_grid: $PEER_PY not found (copy ../shared/peers/ to .peers/)" >&2; exit 2; }
log_every=$(( ITERS >= 1000 ? ITERS / 4 : ITERS ))
for d in $GRID_D; do
  for r in $GRID_R; do
    (( 2 * r < d )) || continue
    for p in $GRID_P; do
      tag="d${d}_r${r}_p${p}"
      lr=$(python3 -c "print(f'{5e3 * ($d / 1000) ** (4 / 3) * (0.2 / $p):.6g}')")
      mlist=""
      for m in $METHODS; do
        [[ $m == original && $d -gt $ORIG_MAX_D ]] && continue
        mlist="$mlist${mlist:+,}$m"
      done
      [[ -z $mlist ]] && continue
      target="$OUTDIR/target_$tag.txt"
      src=(--target "$target")
      if [[ $PEER != 0 ]]; then
        D=$d R=$r P=$p SEED=0 L=3 EPS=1e-3 LR=$lr GAMMA=0.01 ITERS=$ITERS METHODS=$mlist TARGET_OUT="$target" \
          timeout 900 python3 "$PEER_PY" > "$OUTDIR/peer_$tag.log" 2>&1
        grep '^{' "$OUTDIR/peer_$tag.log" | while read -r line; do
          echo "{\"side\":\"peer\",\"tag\":\"$tag\",\"d\":$d,\"r\":$r,\"p\":$p,\"row\":$line}" >> "$rows"
        done
        [[ -s $target ]] || { echo "deep_mc_grid: the peer wrote no target at $tag (see peer_$tag.log)" >&2; continue; }
      else
        src=(--d "$d" --p "$p")
      fi
      for m in $METHODS; do
        [[ $m == original && $d -gt $ORIG_MAX_D ]] && continue
        impls=$IMPLS
        [[ $m == original ]] && impls=fused
        for impl in $impls; do
          log="$OUTDIR/ours_${tag}_${m}_$impl.log"
          ./build/deep_mc "${src[@]}" --r "$r" --L 3 --eps 1e-3 --lr "$lr" --gamma 0.01 --iters "$ITERS" \
            --method "$m" --impl "$impl" --dtype f64 --device "${DEVICE:-cuda}" --graph on --log-every "$log_every" > "$log" 2>&1
          rc=$?
          if [[ $rc == 0 ]]; then
            echo "{\"side\":\"ours\",\"tag\":\"$tag\",\"d\":$d,\"r\":$r,\"p\":$p,\"impl_asked\":\"$impl\",\"row\":$(tail -1 "$log")}" >> "$rows"
          else
            echo "{\"side\":\"ours\",\"tag\":\"$tag\",\"d\":$d,\"r\":$r,\"p\":$p,\"impl_asked\":\"$impl\",\"method\":\"$m\",\"rc\":$rc,\"error\":$(tail -1 "$log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}" >> "$rows"
          fi
        done
      done
      [[ ${KEEP_TARGETS:-0} == 1 ]] || rm -f "$target"
    done
  done
done
python3 - "$rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peer, ours = {}, {}
for x in rows:
    if x["side"] == "peer":
        peer[(x["tag"], x["row"]["name"])] = x["row"]
    elif "row" in x:
        for run in x["row"]["runs"]:
            ours[(x["tag"], run["method"], x["impl_asked"])] = (x, run)
    else:
        ours[(x["tag"], x["method"], x["impl_asked"])] = (x, None)
print("| d | r | p | method | ours (impl) µs/iter | peer µs/iter | peer / ours | recovery ours | recovery peer |")
print("|---|---|---|---|---|---|---|---|---|")
for (tag, m, impl), (x, run) in ours.items():
    pr = peer.get((tag, m))
    if run is None:
        print(f"| {x['d']} | {x['r']} | {x['p']} | {m} | {impl}: not run ({x['error'][:60]}) | | | | |")
        continue
    pu = pr["us_per_iter"] if pr else None
    ratio = f"{pu / run['us_per_iter']:.2f}x" if pu and run["us_per_iter"] > 0 else "-"
    used = run.get("impl", impl)
    shown = impl if used == impl else f"{impl}: {used}"
    print(f"| {x['d']} | {x['r']} | {x['p']} | {m} | {run['us_per_iter']:.1f} ({shown}) | "
          f"{pu if pu is not None else '-'} | {ratio} | {run['recovery']:.2e} | "
          f"{pr['recovery']:.2e} |" if pr else
          f"| {x['d']} | {x['r']} | {x['p']} | {m} | {run['us_per_iter']:.1f} ({shown}) | - | - | {run['recovery']:.2e} | - |")
PY
