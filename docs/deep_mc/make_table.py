"""Merges the deep MC grid runs (tools/deep_mc_grid.sh outputs in this folder) into one table:
per (d, r, p) the JAX peer's compressed µs/iter, ours per implementation (the latest run of each),
auto's pick, and the ratio; the original beside JAX where both ran. Run: python3 make_table.py"""
import json, glob, os
here = os.path.dirname(os.path.abspath(__file__))
peer, ours = {}, {}
for f in sorted(glob.glob(os.path.join(here, "run*.jsonl"))):
    stale_dense = "run1_" in f  # run 1's dense step predates the fixes of commit 'Gram partials ...'
    for line in open(f):
        x = json.loads(line)
        key = (x["d"], x["r"], x["p"])
        if x["side"] == "peer":
            peer[key + (x["row"]["name"],)] = x["row"]["us_per_iter"]
        elif "row" in x:
            for run in x["row"]["runs"]:
                if stale_dense and run["impl"] == "dense":
                    continue
                ours[key + (run["method"], run["impl"])] = run["us_per_iter"]
                if x["impl_asked"] == "auto":
                    ours[key + (run["method"], "auto")] = run["impl"]
pts = sorted({k[:3] for k in ours})
print("| d | r | p | JAX compressed | ours fused | ours dense | auto picks | JAX / ours (auto) | original: JAX / ours |")
print("|---|---|---|---|---|---|---|---|---|")
def fmt(v):
    return f"{v:.1f}" if isinstance(v, float) else "–"
for d, r, p in pts:
    pj = peer.get((d, r, p, "compressed"))
    fu = ours.get((d, r, p, "compressed", "fused"))
    de = ours.get((d, r, p, "compressed", "dense"))
    pick = ours.get((d, r, p, "compressed", "auto")) or ("fused" if fu is not None else "dense")
    best = fu if pick == "fused" else de
    ratio = f"{pj / best:.2f}x" if pj and best else "–"
    oj, oo = peer.get((d, r, p, "original")), ours.get((d, r, p, "original", "fused"))
    orat = f"{oj / oo:.2f}x ({oj:.0f} / {oo:.0f} µs)" if oj and oo else "–"
    print(f"| {d} | {r} | {p} | {fmt(pj)} | {fmt(fu)} | {fmt(de)} | {pick} | {ratio} | {orat} |")
