#!/usr/bin/env python3
"""Plot deep matrix completion trajectories written by `deep_mc --csv PATH`.

Draws the recovery error (and, dashed, the train loss) against the iteration and against the
training wall-clock time, one line per (CSV file, method), into one PNG with two panels.

    python3 tools/plot_deep_mc.py run.csv [more.csv ...] -o deep_mc.png [--title TEXT]

Needs matplotlib (Debian: apt-get install python3-matplotlib, then run it with Debian's /usr/bin/python3
when another python3 comes first on the PATH). CSV columns: method,iter,train_loss,recovery,elapsed_s.
"""
import argparse
import csv
import os
import sys


def read(path):
    runs = {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        need = {"method", "iter", "train_loss", "recovery", "elapsed_s"}
        if rows.fieldnames is None or not need.issubset(rows.fieldnames):
            sys.exit(f"plot_deep_mc: {path}: expected the columns {sorted(need)}, got {rows.fieldnames}")
        for n, row in enumerate(rows, start=2):
            try:
                r = runs.setdefault(row["method"], {"iter": [], "train": [], "rec": [], "t": []})
                r["iter"].append(int(row["iter"]))
                r["train"].append(float(row["train_loss"]))
                r["rec"].append(float(row["recovery"]))
                r["t"].append(float(row["elapsed_s"]))
            except (ValueError, TypeError) as e:
                sys.exit(f"plot_deep_mc: {path}: line {n}: {e}")
    if not runs:
        sys.exit(f"plot_deep_mc: {path}: no data rows")
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="CSV files from deep_mc --csv")
    ap.add_argument("-o", "--out", default="deep_mc.png", help="output PNG (default deep_mc.png)")
    ap.add_argument("--title", default="deep matrix completion: original vs compressed")
    ap.add_argument("--no-train", action="store_true", help="leave out the train-loss curves")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for path in args.csv:
        tag = os.path.splitext(os.path.basename(path))[0] if len(args.csv) > 1 else ""
        for method, r in sorted(read(path).items()):
            c = colors[k % len(colors)]
            k += 1
            label = f"{method} ({tag})" if tag else method
            floor = 1e-300  # log axes: zero errors are drawn at the floor
            rec = [max(v, floor) for v in r["rec"]]
            tr = [max(v, floor) for v in r["train"]]
            ax_it.semilogy(r["iter"], rec, color=c, label=f"{label}: recovery")
            ax_t.semilogy(r["t"], rec, color=c, label=f"{label}: recovery")
            if not args.no_train:
                ax_it.semilogy(r["iter"], tr, color=c, ls="--", alpha=0.6, label=f"{label}: train")
                ax_t.semilogy(r["t"], tr, color=c, ls="--", alpha=0.6, label=f"{label}: train")
    ax_it.set_xlabel("iteration")
    ax_t.set_xlabel("training wall-clock (s)")
    for ax in (ax_it, ax_t):
        ax.set_ylabel("½·mean squared error")
        ax.grid(True, which="both", alpha=0.3)
    ax_it.legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot_deep_mc: wrote {args.out}")


if __name__ == "__main__":
    main()
