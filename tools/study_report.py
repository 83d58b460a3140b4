#!/usr/bin/python3
"""Write the few-shot study's report (markdown + PNGs) from the study runner's output.

    tools/study_report.py DIR [--out DIR] [--rank R] [--pairs A:B,...] [--ns 16,64] [--metric acc|acc_norm]

Reads DIR/runs.jsonl (one line per fine-tune), DIR/selection.jsonl (one line per cell
(task, method, variant, n, rank) with the lr chosen by mean validation accuracy over seeds; when the
file is missing the same rule is applied to runs.jsonl) and DIR/study.json (grid and timing,
optional). Writes into --out (default DIR): report.md, acc_vs_n.png, acc_vs_rank.png, acc_vs_lr.png
and report.json (the numbers behind the tables).

report.md holds:
  1. per task: test accuracy mean ± std over seeds at each cell's selected lr; rows = method
     (+[variant]), columns = n, at the main rank (the rank with the most cells, or --rank); the
     chance level 1/#classes (study.json "classes" per task, else options "classes"/"n_classes"/...).
  2. paired differences A − B of test accuracy (--pairs; default deeplora:lora, deeplora:lora-noscale,
     deeplora:deeplora-random), each method at its own selected lr, paired by seed: per task, n and
     rank the mean difference with a 95% t-interval (df = pairs − 1), and a pooled line over tasks
     (all task×seed pairs). Intervals that exclude 0 are bold.
  3. the selected lr per (task, method, n, rank), with grid-edge marks, and a per-method summary.
  4. rank robustness: accuracy vs rank at the --ns values (table + acc_vs_rank.png).
  5. accuracy vs n at the main rank (acc_vs_n.png, log2 x axis).
  6. lr sensitivity: validation and test accuracy vs lr at the --ns values and the main rank
     (acc_vs_lr.png), and per method the tuning spread (best − median test accuracy over the lr grid,
     averaged over cells) and the selection regret (best − selected test accuracy).
  7. method variants (non-default method options) against the method's default, when present.
  8. fit: mean training loss at each cell's selected lr (underfitting vs overfitting), and per method
     the runs with skipped (non-finite) steps.
Accuracies are in %, differences in percentage points. std is the sample std (n−1) over seeds.
Bad input (missing or mistyped fields, unreadable files) is an error naming file:line, exit 2.
Needs Debian's python3-matplotlib and python3-numpy (run with /usr/bin/python3).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict

PROG = "study_report"

# two-sided 95% Student t quantiles t_{0.975, df}
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
        18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595,
        26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452, 30: 2.0423, 40: 2.0211, 50: 2.0086, 60: 2.0003,
        80: 1.9901, 100: 1.9840, 120: 1.9799, 200: 1.9719, 500: 1.9647, 1000: 1.9623}
Z975 = 1.9600

METHOD_ORDER = ["lora", "lora-noscale", "deeplora", "deeplora-random", "full"]
DEFAULT_PAIRS = ("deeplora:lora,deeplora:lora-noscale,deeplora:deeplora-random,"
                 "deeplora[gamma=1]:lora,deeplora[gamma=1,L=2]:lora,deeplora[wide]:lora,deeplora[wide]:deeplora")
SELECTION_RULE = "lr chosen by mean validation accuracy over seeds; test never read for any choice"


class InputError(Exception):
    pass


def t975(df):
    """t quantile from the table; between entries, linear in 1/df (exact at the entries)."""
    if df < 1:
        return math.nan
    if df in T975:
        return T975[df]
    keys = sorted(T975)
    if df > keys[-1]:
        lo, hi = keys[-1], math.inf
        tlo, thi = T975[lo], Z975
    else:
        hi = next(k for k in keys if k > df)
        lo = max(k for k in keys if k < df)
        tlo, thi = T975[lo], T975[hi]
    x, xlo, xhi = 1.0 / df, 1.0 / lo, (0.0 if hi == math.inf else 1.0 / hi)
    return thi + (tlo - thi) * (x - xhi) / (xlo - xhi)


def mean_ci(xs):
    """(mean, sd, lo, hi, k) with a 95% t-interval; sd/lo/hi are NaN for fewer than 2 values."""
    k = len(xs)
    if k == 0:
        return (math.nan,) * 4 + (0,)
    m = statistics.fmean(xs)
    if k < 2:
        return m, math.nan, math.nan, math.nan, k
    sd = statistics.stdev(xs)
    h = t975(k - 1) * sd / math.sqrt(k)
    return m, sd, m - h, m + h, k


def label_of(method, variant):
    return f"{method}[{variant}]" if variant else method


def label_sort_key(label):
    method, _, variant = label.partition("[")
    i = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (i, method, variant != "", variant)


def rank_key(r):
    return (r is None, r if r is not None else 0)


def lr_key(lr):
    return (lr is None, lr if lr is not None else 0.0)


def same_lr(a, b):
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-30)


# --------------------------------------------------------------------------------------------- input

def _get(row, key, where, kind, required=True, default=None):
    if key not in row:
        if required:
            raise InputError(f"{where}: missing field \"{key}\"")
        return default
    v = row[key]
    if kind == "str":
        if v is None and not required:
            return default
        if not isinstance(v, str):
            raise InputError(f"{where}: field \"{key}\" should be a string, got {json.dumps(v)}")
        return v
    if kind in ("int", "int?"):
        if v is None and kind == "int?":
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and v != int(v)):
            raise InputError(f"{where}: field \"{key}\" should be an integer{' or null' if kind == 'int?' else ''}, "
                             f"got {json.dumps(v)}")
        return int(v)
    if kind in ("num", "num?"):
        if v is None:
            if kind == "num?":
                return None
            return math.nan  # nlohmann writes NaN as null
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{where}: field \"{key}\" should be a number, got {json.dumps(v)}")
        return float(v)
    raise AssertionError(kind)


def read_jsonl(path):
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}")
    rows = []
    with f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            try:
                row = json.loads(s)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not JSON ({e.msg})")
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: not a JSON object")
            rows.append((f"{path}:{lineno}", row))
    return rows


def load_runs(path, metric):
    test_key, val_key = ("test_acc", "val_acc") if metric == "acc" else ("test_acc_norm", "val_acc_norm")
    runs = []
    for where, row in read_jsonl(path):
        r = {
            "where": where,
            "task": _get(row, "task", where, "str"),
            "method": _get(row, "method", where, "str"),
            "variant": _get(row, "variant", where, "str", required=False, default="") or "",
            "n": _get(row, "n", where, "int"),
            "seed": _get(row, "seed", where, "int"),
            "rank": _get(row, "rank", where, "int?", required=False, default=None),
            "lr": _get(row, "lr", where, "num?"),
            "val": _get(row, val_key, where, "num"),
            "test": _get(row, test_key, where, "num"),
            "seconds": _get(row, "seconds", where, "num?", required=False),
            "n_trainable": _get(row, "n_trainable", where, "int?", required=False),
            "train_loss": _get(row, "train_loss", where, "num?", required=False),
            "bad_steps": _get(row, "bad_steps", where, "int?", required=False, default=0) or 0,
            "options": row.get("options") if isinstance(row.get("options"), dict) else {},
        }
        r["label"] = label_of(r["method"], r["variant"])
        runs.append(r)
    if not runs:
        raise InputError(f"{path}: no runs")
    return runs


def load_selection(path):
    sel = []
    for where, row in read_jsonl(path):
        s = {
            "where": where,
            "task": _get(row, "task", where, "str"),
            "method": _get(row, "method", where, "str"),
            "variant": _get(row, "variant", where, "str", required=False, default="") or "",
            "n": _get(row, "n", where, "int"),
            "rank": _get(row, "rank", where, "int?", required=False, default=None),
            "lr": _get(row, "lr", where, "num?"),
            "lrs": row.get("lrs"),
            "val_acc_mean": _get(row, "val_acc_mean", where, "num?", required=False),
            "test_acc_mean": _get(row, "test_acc_mean", where, "num?", required=False),
            "seeds": _get(row, "seeds", where, "int?", required=False),
        }
        if s["lrs"] is not None and not (isinstance(s["lrs"], list) and all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in s["lrs"])):
            raise InputError(f"{where}: field \"lrs\" should be a list of numbers")
        s["label"] = label_of(s["method"], s["variant"])
        sel.append(s)
    return sel


def load_study(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({getattr(e, 'msg', e)})")
    if not isinstance(st, dict):
        raise InputError(f"{path}: not a JSON object")
    return st


# ------------------------------------------------------------------------------------------- analysis

class Study:
    def __init__(self, runs, selection, study, args):
        self.runs, self.study, self.args = runs, study or {}, args
        self.warnings, self.notes = [], []
        # grid[cell][lr][seed] = run; cell = (task, label, n, rank)
        self.grid = defaultdict(lambda: defaultdict(dict))
        dups = 0
        for r in runs:
            cell = (r["task"], r["label"], r["n"], r["rank"])
            lrs = self.grid[cell]
            lr = next((x for x in lrs if same_lr(x, r["lr"])), r["lr"])
            if r["seed"] in lrs[lr]:
                dups += 1
                if dups <= 5:
                    self.warnings.append(f"{r['where']}: duplicate run (task {r['task']}, {r['label']}, n={r['n']}, "
                                         f"rank={r['rank']}, lr={fmt_lr(lr)}, seed {r['seed']}); the later line is used")
            lrs[lr][r["seed"]] = r
        if dups > 5:
            self.warnings.append(f"{dups} duplicate runs in all (first 5 listed)")
        self.cells = sorted(self.grid, key=lambda c: (c[0], label_sort_key(c[1]), c[2], rank_key(c[3])))
        self.tasks = sorted({c[0] for c in self.cells})
        self.labels = sorted({c[1] for c in self.cells}, key=label_sort_key)
        self.ns = sorted({c[2] for c in self.cells})
        self.ranks = sorted({c[3] for c in self.cells if c[3] is not None})
        self.seeds = sorted({r["seed"] for r in runs})
        self.rankless = {lab for lab in self.labels if all(c[3] is None for c in self.cells if c[1] == lab)}
        self._select(selection)
        self._check_seeds()
        self.main_rank = self._main_rank()
        self.chance = self._chance()

    # -- selection
    def _recompute(self, cell):
        best, best_v = None, -math.inf
        for lr, seeds in sorted(self.grid[cell].items(), key=lambda kv: lr_key(kv[0])):
            vals = [r["val"] for r in seeds.values() if math.isfinite(r["val"])]
            v = statistics.fmean(vals) if vals else -math.inf
            if v > best_v + 1e-12:
                best, best_v = lr, v
        return best, best_v

    def _select(self, selection):
        self.sel = {}  # cell -> {"lr", "lrs"}
        if selection is None:
            self.notes.append("selection.jsonl is missing: the lr of each cell was chosen here by the same rule "
                              "(highest mean validation accuracy over seeds; ties to the smaller lr).")
            for cell in self.cells:
                lr, _ = self._recompute(cell)
                self.sel[cell] = {"lr": lr, "lrs": sorted(self.grid[cell], key=lr_key), "where": None}
            return
        for s in selection:
            cell = (s["task"], s["label"], s["n"], s["rank"])
            if cell in self.sel:
                self.warnings.append(f"{s['where']}: second selection line for the same cell; the later one is used")
            if cell not in self.grid:
                self.warnings.append(f"{s['where']}: selected cell (task {s['task']}, {s['label']}, n={s['n']}, "
                                     f"rank={s['rank']}) has no runs in runs.jsonl; left out")
                continue
            found = [x for x in self.grid[cell] if same_lr(x, s["lr"])]
            lr = found[0] if found else None
            if not found:
                self.warnings.append(f"{s['where']}: selected lr {fmt_lr(s['lr'])} has no runs in runs.jsonl; cell left out")
                continue
            lrs = s["lrs"] if s["lrs"] else sorted(self.grid[cell], key=lr_key)
            self.sel[cell] = {"lr": lr, "lrs": sorted(lrs, key=lr_key), "where": s["where"]}
            best, best_v = self._recompute(cell)
            seeds = self.grid[cell][lr]
            vals = [r["val"] for r in seeds.values() if math.isfinite(r["val"])]
            v = statistics.fmean(vals) if vals else -math.inf
            if v < best_v - 1e-9:
                self.warnings.append(
                    f"{s['where']}: selected lr {fmt_lr(lr)} has mean val acc {pct(v)}, but lr {fmt_lr(best)} in "
                    f"runs.jsonl has {pct(best_v)} (selection does not follow the stated rule)")
            if s["test_acc_mean"] is not None:
                tv = [r["test"] for r in seeds.values()]
                if tv and abs(statistics.fmean(tv) - s["test_acc_mean"]) > 1e-6:
                    self.warnings.append(f"{s['where']}: test_acc_mean {s['test_acc_mean']:.6g} differs from the mean "
                                         f"of runs.jsonl at that lr ({statistics.fmean(tv):.6g})")
        missing = [c for c in self.cells if c not in self.sel]
        if missing:
            ex = ", ".join(cell_name(c) for c in missing[:5])
            self.warnings.append(f"{len(missing)} cell(s) in runs.jsonl have no line in selection.jsonl and are left "
                                 f"out of the tables: {ex}{' …' if len(missing) > 5 else ''}")

    def _check_seeds(self):
        counts = {(cell, lr): len(seeds) for cell in self.cells for lr, seeds in self.grid[cell].items()}
        self.max_seeds = max(counts.values()) if counts else 0
        short = []
        for cell in self.cells:
            got = {lr: len(seeds) for lr, seeds in self.grid[cell].items()}
            if min(got.values()) >= self.max_seeds:
                continue
            if len(set(got.values())) == 1:
                short.append(f"{cell_name(cell)}: {min(got.values())} seed(s) at every lr, fewer than the "
                             f"{self.max_seeds} of other cells")
            else:
                short.append(f"{cell_name(cell)}: fewer seeds than the {self.max_seeds} of other cells at some lrs ("
                             + ", ".join(f"lr={fmt_lr(lr)}: {k}" for lr, k in sorted(got.items(), key=lambda kv: lr_key(kv[0]))
                                         if k < self.max_seeds) + ")")
        self.warnings += short[:20]
        if len(short) > 20:
            self.warnings.append(f"{len(short)} cells in all have fewer than {self.max_seeds} seeds (first 20 listed)")
        lr_counts = Counter(len(self.grid[c]) for c in self.cells)
        if len(lr_counts) > 1:
            most = lr_counts.most_common(1)[0][0]
            odd = [c for c in self.cells if len(self.grid[c]) != most]
            self.warnings.append(f"{len(odd)} cell(s) tried a different number of lrs than the usual {most}: "
                                 + ", ".join(f"{cell_name(c)} ({len(self.grid[c])})" for c in odd[:5])
                                 + (" …" if len(odd) > 5 else ""))

    def _main_rank(self):
        if self.args.rank is not None:
            if self.args.rank not in self.ranks:
                raise InputError(f"--rank {self.args.rank}: no cell has that rank (ranks: {self.ranks})")
            return self.args.rank
        cnt = Counter(c[3] for c in self.sel if c[3] is not None)
        if not cnt:
            return None
        top = max(cnt.values())
        return min(r for r, k in cnt.items() if k == top)

    def _chance(self):
        out = {}
        cls = self.study.get("classes")
        chance = self.study.get("chance")
        for t in self.tasks:
            k = None
            if isinstance(cls, dict) and t in cls:
                k = cls[t]
            elif isinstance(cls, (int, float)) and not isinstance(cls, bool):
                k = cls
            if isinstance(k, list):
                k = len(k)
            if k is None:
                found = Counter()
                for r in self.runs:
                    if r["task"] != t:
                        continue
                    for key in ("classes", "n_classes", "num_classes", "n_choices", "num_choices", "choices"):
                        v = r["options"].get(key)
                        if isinstance(v, list):
                            v = len(v)
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                            found[int(v)] += 1
                            break
                if found:
                    k = found.most_common(1)[0][0]
            if isinstance(chance, dict) and isinstance(chance.get(t), (int, float)):
                out[t] = (float(chance[t]), k)
            elif isinstance(k, (int, float)) and k > 0:
                out[t] = (1.0 / k, int(k))
        return out

    # -- lookups
    def cell_at(self, task, label, n, rank):
        """The selected cell for (task, label, n, rank); methods without a rank (full) match any rank."""
        c = (task, label, n, rank)
        if c in self.sel:
            return c
        c = (task, label, n, None)
        if label in self.rankless and c in self.sel:
            return c
        return None

    def selected_tests(self, cell):
        """{seed: test accuracy} at the cell's selected lr."""
        if cell is None or cell not in self.sel:
            return {}
        return {s: r["test"] for s, r in self.grid[cell][self.sel[cell]["lr"]].items()}

    def cell_stats(self, cell):
        t = self.selected_tests(cell)
        vals = [v for v in t.values() if math.isfinite(v)]
        if not vals:
            return None
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else math.nan,
                "seeds": len(vals), "lr": self.sel[cell]["lr"]}

    def paired(self, task, a, b, n, rank):
        ca, cb = self.cell_at(task, a, n, rank), self.cell_at(task, b, n, rank)
        if ca is None or cb is None:
            return None
        ta, tb = self.selected_tests(ca), self.selected_tests(cb)
        seeds = sorted(set(ta) & set(tb))
        return [(s, ta[s] - tb[s]) for s in seeds if math.isfinite(ta[s]) and math.isfinite(tb[s])]

    def lr_curve(self, cell):
        """[(lr, mean val, mean test, std test, seeds)] over the lr grid of a cell."""
        out = []
        for lr, seeds in sorted(self.grid[cell].items(), key=lambda kv: lr_key(kv[0])):
            v = [r["val"] for r in seeds.values() if math.isfinite(r["val"])]
            t = [r["test"] for r in seeds.values() if math.isfinite(r["test"])]
            out.append((lr, statistics.fmean(v) if v else math.nan, statistics.fmean(t) if t else math.nan,
                        statistics.stdev(t) if len(t) > 1 else math.nan, len(seeds)))
        return out


def split_pairs(text):
    """'A:B,C[x=1,y=2]:D' -> ['A:B', 'C[x=1,y=2]:D']: commas inside a variant's brackets do not split."""
    out, cur, depth = [], "", 0
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def cell_name(c):
    task, label, n, rank = c
    return f"{task}/{label}/n={n}" + (f"/r={rank}" if rank is not None else "")


# ------------------------------------------------------------------------------------------ formatting

def pct(x):
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def pm(st):
    if st is None:
        return "–"
    s = pct(st["mean"])
    if math.isfinite(st["std"]):
        s += f" ± {pct(st['std'])}"
    return s


def fmt_lr(lr):
    if lr is None:
        return "–"
    if lr == 0:
        return "0"
    m, e = f"{lr:.2e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def fmt_diff(d):
    """'+2.3 [-0.5, +5.1]' in percentage points; bold when the interval excludes 0."""
    m, sd, lo, hi, k = d
    if k == 0:
        return "–"
    if k < 2:
        return f"{100 * m:+.1f} (1 pair)"
    s = f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"**{s}**" if (lo > 0 or hi < 0) else s


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def human_s(s):
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
        return str(s)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def rank_str(r):
    return "–" if r is None else str(r)


# --------------------------------------------------------------------------------------------- figures

def _colors(labels):
    import matplotlib.pyplot as plt
    cyc = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {lab: cyc[i % len(cyc)] for i, lab in enumerate(labels)}


def _legend_below(fig, handles, labels, ncol_max=5):
    if not labels:
        return 0.0
    ncol = min(len(labels), ncol_max)
    rows = math.ceil(len(labels) / ncol)
    h_in = fig.get_figheight()
    frac = min(0.4, (0.28 * rows + 0.25) / h_in)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    return frac


def _dodge(S, lab):
    """A small multiplicative x offset per method so that error bars at the same x do not overlap."""
    k = len(S.labels)
    return 2 ** (0.04 * (S.labels.index(lab) - (k - 1) / 2)) if k > 1 else 1.0


def _log2_axis(ax, xs):
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(xs)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(x) for x in sorted(xs)])
    if len(xs) == 1:
        x = list(xs)[0]
        ax.set_xlim(x / 1.6, x * 1.6)


def _finish(fig, handles, labels, out, title):
    fig.suptitle(title, fontsize=11)
    bottom = _legend_below(fig, handles, labels)
    top = 1 - min(0.1, 0.32 / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, top))
    fig.savefig(out, dpi=110)


def _collect_handles(fig):
    seen = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in seen:
                seen[lab] = h
    order = {lab: i for i, lab in enumerate(fig._labels_order)} if hasattr(fig, "_labels_order") else {}
    keys = sorted(seen, key=lambda k: (k == "chance", order.get(k.replace(" (no rank)", ""), len(order))))
    return [seen[k] for k in keys], keys


def fig_acc_vs_n(S, out):
    import matplotlib.pyplot as plt
    colors = _colors(S.labels)
    nt = len(S.tasks)
    ncol = min(3, nt)
    nrow = math.ceil(nt / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.7 * nrow + 0.9), squeeze=False)
    fig._labels_order = S.labels
    pos_ns = [n for n in S.ns if n > 0]
    for i, task in enumerate(S.tasks):
        ax = axes[i // ncol][i % ncol]
        for lab in S.labels:
            pts = []
            for n in pos_ns:
                st = S.cell_stats(S.cell_at(task, lab, n, S.main_rank))
                if st:
                    pts.append((n * _dodge(S, lab), st["mean"] * 100,
                                (st["std"] * 100 if math.isfinite(st["std"]) else 0.0)))
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, color=colors[lab], marker="o", markersize=4, capsize=3,
                            linewidth=1.4, label=lab + (" (no rank)" if lab in S.rankless and S.main_rank else ""))
        if task in S.chance:
            ax.axhline(S.chance[task][0] * 100, color="gray", linestyle=":", linewidth=1.0, label="chance")
        if pos_ns:
            _log2_axis(ax, pos_ns)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("n (training examples)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    for j in range(nt, nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    h, l = _collect_handles(fig)
    rk = f"rank {S.main_rank}" if S.main_rank is not None else "all methods"
    _finish(fig, h, l, out, f"test accuracy vs n ({rk}, selected lr; error bars: std over seeds)")
    plt.close(fig)


def _grid_fig(S, ns):
    import matplotlib.pyplot as plt
    nrow, ncol = len(S.tasks), len(ns)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol + 0.3, 3.4 * nrow + 0.9), squeeze=False)
    fig._labels_order = S.labels
    return plt, fig, axes


def fig_acc_vs_rank(S, ns, out):
    colors = _colors(S.labels)
    plt, fig, axes = _grid_fig(S, ns)
    for i, task in enumerate(S.tasks):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            for lab in S.labels:
                c = colors[lab]
                if lab in S.rankless:
                    st = S.cell_stats(S.cell_at(task, lab, n, None))
                    if st:
                        ax.axhline(st["mean"] * 100, color=c, linestyle="--", linewidth=1.2, label=f"{lab} (no rank)")
                        if math.isfinite(st["std"]):
                            ax.axhspan((st["mean"] - st["std"]) * 100, (st["mean"] + st["std"]) * 100, color=c, alpha=0.1)
                    continue
                pts = []
                for r in S.ranks:
                    st = S.cell_stats((task, lab, n, r) if (task, lab, n, r) in S.sel else None)
                    if st:
                        pts.append((r * _dodge(S, lab), st["mean"] * 100,
                                    st["std"] * 100 if math.isfinite(st["std"]) else 0.0))
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, color=c, marker="o", markersize=4, capsize=3, linewidth=1.4, label=lab)
            if task in S.chance:
                ax.axhline(S.chance[task][0] * 100, color="gray", linestyle=":", linewidth=1.0, label="chance")
            if S.ranks:
                _log2_axis(ax, S.ranks)
            ax.set_title(f"{task}, n={n}", fontsize=10)
            ax.set_xlabel("rank")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
    h, l = _collect_handles(fig)
    _finish(fig, h, l, out, "test accuracy vs rank (selected lr per cell; error bars: std over seeds)")
    plt.close(fig)


def fig_acc_vs_lr(S, ns, out):
    from matplotlib.lines import Line2D
    colors = _colors(S.labels)
    plt, fig, axes = _grid_fig(S, ns)
    for i, task in enumerate(S.tasks):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            grid_lrs = set()
            for lab in S.labels:
                cell = S.cell_at(task, lab, n, S.main_rank)
                if cell is None:
                    continue
                curve = [p for p in S.lr_curve(cell) if p[0] is not None and p[0] > 0]
                if not curve:
                    continue
                dx = _dodge(S, lab)
                lrs = [p[0] * dx for p in curve]
                grid_lrs.update(p[0] for p in curve)
                c = colors[lab]
                ax.errorbar(lrs, [p[2] * 100 for p in curve],
                            yerr=[p[3] * 100 if math.isfinite(p[3]) else 0.0 for p in curve],
                            color=c, marker="o", markersize=4, capsize=2, linewidth=1.4, label=lab)
                ax.plot(lrs, [p[1] * 100 for p in curve], color=c, linestyle="--", linewidth=1.0, alpha=0.8)
                sel = S.sel[cell]["lr"]
                for p in curve:
                    if same_lr(p[0], sel):
                        ax.plot([p[0] * dx], [p[2] * 100], marker="*", markersize=12, color=c,
                                markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
            if task in S.chance:
                ax.axhline(S.chance[task][0] * 100, color="gray", linestyle=":", linewidth=1.0, label="chance")
            ax.set_xscale("log")
            if 0 < len(grid_lrs) <= 8:
                from matplotlib.ticker import FixedLocator, NullFormatter
                ax.xaxis.set_major_locator(FixedLocator(sorted(grid_lrs)))
                ax.set_xticklabels([fmt_lr(x) for x in sorted(grid_lrs)])
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{task}, n={n}" + (f", rank {S.main_rank}" if S.main_rank is not None else ""), fontsize=10)
            ax.set_xlabel("learning rate")
            ax.set_ylabel("accuracy (%)")
            ax.grid(True, alpha=0.3, which="both")
    h, l = _collect_handles(fig)
    h += [Line2D([], [], color="black", linewidth=1.4), Line2D([], [], color="black", linestyle="--", linewidth=1.0),
          Line2D([], [], color="black", marker="*", markersize=10, linestyle="none")]
    l += ["test (mean ± std)", "validation (mean)", "selected lr"]
    _finish(fig, h, l, out, "accuracy vs learning rate")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report

def build(S, out_dir):
    args = S.args
    R = {"main_rank": S.main_rank, "n_runs": len(S.runs), "tasks": S.tasks, "methods": S.labels, "ns": S.ns,
         "ranks": S.ranks, "seeds": S.seeds}
    md = []
    w = md.append
    w("# Few-shot study report\n")
    w(f"Generated by `tools/study_report.py` from `{os.path.abspath(args.dir)}`. Accuracies are in %, "
      f"differences in percentage points; std is the sample std (n−1) over seeds. "
      f"Metric: `{'test_acc' if args.metric == 'acc' else 'test_acc_norm'}`.\n")
    w("## Setup\n")
    seeds_per = Counter(len(S.grid[c][S.sel[c]["lr"]]) for c in S.sel)
    lrs_all = sorted({lr for c in S.cells for lr in S.grid[c]}, key=lr_key)
    w(f"- runs: {len(S.runs)} fine-tunes in {len(S.cells)} cells (task × method × n × rank), "
      f"{len(S.sel)} with a selected lr")
    w(f"- tasks ({len(S.tasks)}): {', '.join(S.tasks)}")
    w(f"- methods: {', '.join(S.labels)}")
    w(f"- n: {', '.join(map(str, S.ns))}; ranks: {', '.join(map(str, S.ranks)) or '–'}"
      + (f"; main rank: {S.main_rank}" + (" (--rank)" if args.rank is not None else " (the rank with the most cells)")
         if S.main_rank is not None else ""))
    w(f"- seeds: {len(S.seeds)} ({', '.join(map(str, S.seeds))}); seeds per cell at the selected lr: "
      + ", ".join(f"{k} ({v} cells)" for k, v in sorted(seeds_per.items())))
    w(f"- learning rates tried: {', '.join(fmt_lr(x) for x in lrs_all)}")
    w(f"- selection rule: {SELECTION_RULE}. The same seed means the same training subset across methods "
      f"(paired).")
    for note in S.notes:
        w(f"- note: {note}")
    w("")
    if S.study:
        w("### study.json\n")
        st = S.study
        rows = []
        for k in ("base", "tasks"):
            if k in st:
                rows.append((k, _short(st[k])))
        if "seconds_total" in st:
            rows.append(("seconds_total", f"{st['seconds_total']} ({human_s(st['seconds_total'])})"))
        for k, v in st.items():
            if k not in ("base", "tasks", "seconds_total", "seconds_by_part"):
                rows.append((k, _short(v)))
        w(md_table(["key", "value"], rows))
        w("")
        sbp = st.get("seconds_by_part")
        if isinstance(sbp, dict) and sbp:
            tot = st.get("seconds_total") if isinstance(st.get("seconds_total"), (int, float)) else None
            trs = []
            for k, v in sbp.items():
                share = f"{100 * v / tot:.1f}%" if tot and isinstance(v, (int, float)) else "–"
                trs.append((k, v, human_s(v), share))
            w("Timing by part:\n")
            w(md_table(["part", "seconds", "time", "share of total"], trs))
            w("")
    run_s = [r["seconds"] for r in S.runs if r["seconds"] is not None and math.isfinite(r["seconds"])]
    if run_s:
        w(f"Fine-tune wall time from runs.jsonl: total {human_s(sum(run_s))}, median {statistics.median(run_s):.2f} s "
          f"per run.\n")

    if S.warnings:
        w("## Warnings\n")
        for x in S.warnings:
            w(f"- {x}")
        w("")

    # 1. accuracy tables
    w("## 1. Test accuracy at the selected lr\n")
    w(f"Mean ± std over seeds; main rank {rank_str(S.main_rank)} (methods without a rank, e.g. full "
      f"fine-tuning, are shown in every rank's table). A cell with fewer seeds than {S.max_seeds} shows the count.\n")
    R["accuracy"] = {}
    for task in S.tasks:
        w(f"### {task}\n")
        rows = []
        for lab in S.labels:
            sts = [S.cell_stats(S.cell_at(task, lab, n, S.main_rank)) for n in S.ns]
            if not any(sts):
                continue
            cells = []
            for n, st in zip(S.ns, sts):
                s = pm(st)
                if st and st["seeds"] < S.max_seeds:
                    s += f" ({st['seeds']} seeds)"
                cells.append(s)
                if st:
                    R["accuracy"].setdefault(task, {}).setdefault(lab, {})[str(n)] = st
            rows.append([lab] + cells)
        w(md_table(["method"] + [f"n={n}" for n in S.ns], rows))
        if task in S.chance:
            p, k = S.chance[task]
            w(f"\nchance: {f'1/{k} = ' if k else ''}{pct(p)}%")
        w("")

    # 2. paired differences
    w("## 2. Paired differences of test accuracy\n")
    w("A − B per seed (same training subset), each method at its own selected lr; mean and 95% t-interval "
      "(df = pairs − 1, t from a built-in table). **Bold**: the interval excludes 0. \"all tasks\" pools "
      "every task × seed pair of that n and rank (df = pairs − 1).\n")
    R["paired"] = []
    pairs = [p.split(":", 1) for p in split_pairs(args.pairs)]
    for a, b in pairs:
        a, b = a.strip(), b.strip()
        miss = [x for x in (a, b) if x not in S.labels]
        if miss:
            w(f"### {a} − {b}\n\nskipped: no runs of {', '.join(miss)}.\n")
            continue
        ranks = sorted({c[3] for c in S.sel if c[1] in (a, b)} - ({None} if S.ranks else set()), key=rank_key)
        if not ranks:
            ranks = [None]
        ranks.sort(key=lambda r: (r != S.main_rank, rank_key(r)))
        w(f"### {a} − {b}\n")
        rows = []
        for rank in ranks:
            pooled = defaultdict(list)
            any_row = False
            for task in S.tasks:
                cells = []
                for n in S.ns:
                    ds = S.paired(task, a, b, n, rank)
                    if ds is None or not ds:
                        cells.append("–")
                        continue
                    d = mean_ci([x for _, x in ds])
                    pooled[n] += [x for _, x in ds]
                    cells.append(fmt_diff(d))
                    R["paired"].append({"a": a, "b": b, "task": task, "n": n, "rank": rank, "mean": d[0], "sd": d[1],
                                        "lo": d[2], "hi": d[3], "pairs": d[4], "seeds": [s for s, _ in ds]})
                if any(c != "–" for c in cells):
                    any_row = True
                    rows.append([task, rank_str(rank)] + cells)
            if any_row and len(S.tasks) > 1:
                cells = []
                for n in S.ns:
                    if pooled[n]:
                        d = mean_ci(pooled[n])
                        cells.append(fmt_diff(d) + f" ({d[4]} pairs)")
                        R["paired"].append({"a": a, "b": b, "task": "*", "n": n, "rank": rank, "mean": d[0],
                                            "sd": d[1], "lo": d[2], "hi": d[3], "pairs": d[4]})
                    else:
                        cells.append("–")
                rows.append(["all tasks", rank_str(rank)] + cells)
        if rows:
            w(md_table(["task", "rank"] + [f"n={n}" for n in S.ns], rows))
        else:
            w("no (task, n, rank) where both have a selected lr.")
        w("")

    # 3. selected lr
    w("## 3. Selected learning rates\n")
    w("The lr chosen for each cell (by mean validation accuracy). (min)/(max): the lowest/highest lr of the "
      "grid tried for that cell — the optimum may lie outside the grid.\n")
    R["selected_lr"] = []
    rows = []
    edge = defaultdict(lambda: [0, 0, []])  # label -> [cells, at edge, lrs]
    for task in S.tasks:
        for lab in S.labels:
            for rank in sorted({c[3] for c in S.sel if c[0] == task and c[1] == lab}, key=rank_key):
                cells = []
                for n in S.ns:
                    c = (task, lab, n, rank)
                    if c not in S.sel:
                        cells.append("–")
                        continue
                    lr, grid = S.sel[c]["lr"], [x for x in S.sel[c]["lrs"] if x is not None]
                    mark = ""
                    if lr is not None and len(grid) > 1:
                        if same_lr(lr, min(grid)):
                            mark = " (min)"
                        elif same_lr(lr, max(grid)):
                            mark = " (max)"
                    cells.append(fmt_lr(lr) + mark)
                    e = edge[lab]
                    e[0] += 1
                    e[1] += bool(mark)
                    if lr is not None:
                        e[2].append(lr)
                    R["selected_lr"].append({"task": task, "method": lab, "n": n, "rank": rank, "lr": lr,
                                             "lrs": S.sel[c]["lrs"]})
                rows.append([task, lab, rank_str(rank)] + cells)
    w(md_table(["task", "method", "rank"] + [f"n={n}" for n in S.ns], rows))
    w("")
    w("Per method, over all its cells:\n")
    rows = []
    for lab in S.labels:
        if lab not in edge:
            continue
        cells, at_edge, lrs = edge[lab]
        geo = math.exp(statistics.fmean(math.log(x) for x in lrs)) if lrs and all(x > 0 for x in lrs) else math.nan
        rows.append([lab, cells, fmt_lr(geo) if math.isfinite(geo) else "–", fmt_lr(min(lrs)) if lrs else "–",
                     fmt_lr(max(lrs)) if lrs else "–", at_edge])
    w(md_table(["method", "cells", "geometric mean lr", "min", "max", "at a grid edge"], rows))
    w("")

    # 4. rank robustness
    ns_pick = [int(x) for x in args.ns.split(",") if x.strip()]
    ns_fig = [n for n in ns_pick if n in S.ns] or sorted({min(S.ns), max(S.ns)})
    w("## 4. Rank robustness\n")
    w(f"Test accuracy vs rank at n = {', '.join(map(str, ns_fig))} (each cell at its selected lr).\n")
    w("![accuracy vs rank](acc_vs_rank.png)\n")
    R["rank"] = {}
    if S.ranks:
        for n in ns_fig:
            w(f"n = {n}:\n")
            rows = []
            for task in S.tasks:
                for lab in S.labels:
                    if lab in S.rankless:
                        st = S.cell_stats(S.cell_at(task, lab, n, None))
                        if st:
                            rows.append([task, lab] + [pm(st) + " (no rank)"] + [""] * (len(S.ranks) - 1))
                        continue
                    sts = [S.cell_stats((task, lab, n, r) if (task, lab, n, r) in S.sel else None) for r in S.ranks]
                    if any(sts):
                        rows.append([task, lab] + [pm(s) for s in sts])
                        for r, s in zip(S.ranks, sts):
                            if s:
                                R["rank"].setdefault(str(n), {}).setdefault(task, {}).setdefault(lab, {})[str(r)] = s
            w(md_table(["task", "method"] + [f"r={r}" for r in S.ranks], rows))
            w("")

    # 5. accuracy vs n
    w("## 5. Accuracy vs n\n")
    w(f"Main rank {rank_str(S.main_rank)}, selected lr per cell; error bars: std over seeds; dotted: chance. "
      f"The numbers are the tables of section 1.\n")
    w("![accuracy vs n](acc_vs_n.png)\n")

    # 6. sensitivity
    w("## 6. Learning-rate sensitivity\n")
    w(f"Validation (dashed) and test (solid, ± std) accuracy over the lr grid at n = {', '.join(map(str, ns_fig))}, "
      f"rank {rank_str(S.main_rank)}; the star marks the selected lr.\n")
    w("![accuracy vs lr](acc_vs_lr.png)\n")
    w("Tuning spread = best minus median mean test accuracy over a cell's lr grid; selection regret = best mean "
      "test accuracy minus the one at the selected lr (what validation-based selection loses). Both averaged over "
      "all cells of the method (every task, n and rank); per n in the last columns.\n")
    R["spread"] = {}
    rows = []
    for lab in S.labels:
        spreads, regrets, by_n, nlr = [], [], defaultdict(list), []
        for c in S.sel:
            if c[1] != lab:
                continue
            curve = [p for p in S.lr_curve(c) if math.isfinite(p[2])]
            if len(curve) < 2:
                continue
            tests = [p[2] for p in curve]
            best = max(tests)
            spreads.append(best - statistics.median(tests))
            by_n[c[2]].append(best - statistics.median(tests))
            nlr.append(len(curve))
            at = next((p[2] for p in curve if same_lr(p[0], S.sel[c]["lr"])), math.nan)
            if math.isfinite(at):
                regrets.append(best - at)
        if not spreads:
            continue
        R["spread"][lab] = {"cells": len(spreads), "spread": statistics.fmean(spreads),
                            "regret": statistics.fmean(regrets) if regrets else math.nan,
                            "by_n": {str(n): statistics.fmean(v) for n, v in by_n.items()}}
        rows.append([lab, len(spreads), f"{statistics.median(nlr):g}", pct(statistics.fmean(spreads)),
                     pct(statistics.fmean(regrets)) if regrets else "–"]
                    + [pct(statistics.fmean(by_n[n])) if by_n[n] else "–" for n in S.ns])
    if rows:
        w(md_table(["method", "cells", "lrs per cell", "tuning spread", "selection regret"]
                   + [f"spread n={n}" for n in S.ns], rows))
    else:
        w("no cell tried more than one lr.")
    w("")

    # 7. variants
    w("## 7. Method variants\n")
    R["variants"] = []
    by_method = defaultdict(set)
    for c in S.sel:
        m, _, v = c[1].partition("[")
        by_method[m].add(c[1])
    var_methods = sorted((m for m, labs in by_method.items() if any("[" in x for x in labs)),
                         key=label_sort_key)
    if not var_methods:
        w("No variants (every method ran with its default options).\n")
    for m in var_methods:
        labs = sorted(by_method[m], key=label_sort_key)
        w(f"### {m}\n")
        w(f"Test accuracy (mean ± std) at each variant's selected lr; Δ: paired difference to the default `{m}` "
          f"(95% t-interval, bold excludes 0).\n")
        rows = []
        for task in S.tasks:
            for rank in sorted({c[3] for c in S.sel if c[0] == task and c[1] in labs and c[1] != m}, key=rank_key):
                for lab in labs:
                    cells = []
                    for n in S.ns:
                        c = (task, lab, n, rank)
                        st = S.cell_stats(c if c in S.sel else None)
                        if not st:
                            cells.append("–")
                            continue
                        s = pm(st) + f" @ {fmt_lr(st['lr'])}"
                        if lab != m:
                            ds = S.paired(task, lab, m, n, rank)
                            if ds:
                                d = mean_ci([x for _, x in ds])
                                s += f"; Δ {fmt_diff(d)}"
                                R["variants"].append({"task": task, "method": lab, "base": m, "n": n, "rank": rank,
                                                      "mean": d[0], "lo": d[2], "hi": d[3], "pairs": d[4]})
                        cells.append(s)
                    if any(x != "–" for x in cells):
                        rows.append([task, rank_str(rank), lab] + cells)
        w(md_table(["task", "rank", "variant"] + [f"n={n}" for n in S.ns], rows))
        w("")

    # 8. fit: does a method fit its training set? (underfitting vs overfitting)
    w("## 8. Fit: training loss at the selected lr\n")
    w("Mean training loss (the runner's mean over the last tenth of the steps) over seeds at each cell's selected "
      f"lr, main rank {rank_str(S.main_rank)}, averaged over tasks; a method that beats another on test with a "
      "higher training loss overfits less, one that loses with a higher training loss underfits. Runs with "
      "skipped (non-finite) steps: count over all of the method's runs, and the lrs where they happened.\n")
    R["fit"] = {}
    rows = []
    for lab in S.labels:
        cells = []
        for n in S.ns:
            losses = []
            for task in S.tasks:
                c = S.cell_at(task, lab, n, S.main_rank)
                if c is None or c not in S.sel:
                    continue
                seeds = S.grid[c].get(S.sel[c]["lr"], {})
                losses += [r["train_loss"] for r in seeds.values() if r.get("train_loss") is not None]
            if losses:
                mu = statistics.fmean(losses)
                R["fit"].setdefault(lab, {})[str(n)] = {"train_loss": mu, "runs": len(losses)}
                cells.append(f"{mu:.3f}")
            else:
                cells.append("–")
        mine = [r for r in S.runs if r["label"] == lab]
        bad = [r for r in mine if r.get("bad_steps", 0) > 0]
        where = sorted({r["lr"] for r in bad}, key=lr_key)
        bad_s = f"{len(bad)} of {len(mine)}" + (f" (lr {', '.join(fmt_lr(x) for x in where)})" if bad else "")
        if any(x != "–" for x in cells):
            rows.append([lab] + cells + [bad_s])
    w(md_table(["method"] + [f"n={n}" for n in S.ns] + ["runs with skipped steps"], rows))
    w("")

    # figures
    fig_acc_vs_n(S, os.path.join(out_dir, "acc_vs_n.png"))
    fig_acc_vs_rank(S, ns_fig, os.path.join(out_dir, "acc_vs_rank.png"))
    fig_acc_vs_lr(S, ns_fig, os.path.join(out_dir, "acc_vs_lr.png"))
    R["warnings"] = S.warnings
    return "\n".join(md).rstrip() + "\n", R


def _short(v, limit=300):
    s = v if isinstance(v, str) else json.dumps(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        s = ", ".join(v)
    return s if len(s) <= limit else s[:limit] + " …"


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(prog="study_report.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", metavar="DIR", nargs="?", default="docs/fewshot",
                    help="the study directory: runs.jsonl, selection.jsonl, study.json (default docs/fewshot)")
    ap.add_argument("--out", default=None, help="output directory (default DIR)")
    ap.add_argument("--rank", type=int, default=None, help="main rank (default: the rank with the most cells)")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS, help=f"A:B pairs for paired differences (default {DEFAULT_PAIRS}); "
                    "a variant is named method[variant]")
    ap.add_argument("--ns", default="16,64", help="n values for the rank and lr figures (default 16,64)")
    ap.add_argument("--metric", choices=("acc", "acc_norm"), default="acc",
                    help="report test_acc (default) or test_acc_norm (selection stays as in selection.jsonl)")
    args = ap.parse_args(argv)
    out_dir = args.out or args.dir
    try:
        if not os.path.isdir(args.dir):
            raise InputError(f"{args.dir}: not a directory")
        runs_path = os.path.join(args.dir, "runs.jsonl")
        if not os.path.isfile(runs_path):
            raise InputError(f"{runs_path}: missing")
        runs = load_runs(runs_path, args.metric)
        sel_path = os.path.join(args.dir, "selection.jsonl")
        selection = load_selection(sel_path) if os.path.isfile(sel_path) else None
        study = load_study(os.path.join(args.dir, "study.json"))
        for p in split_pairs(args.pairs):
            if ":" not in p:
                raise InputError(f"--pairs: '{p}' is not A:B")
        try:
            [int(x) for x in args.ns.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--ns: '{args.ns}' is not a comma-separated list of integers")
        S = Study(runs, selection, study, args)
        if not S.sel:
            raise InputError("no cell has a selected lr")
        os.makedirs(out_dir, exist_ok=True)
        import matplotlib
        matplotlib.use("Agg")
        md, R = build(S, out_dir)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(_jsonable(R), f, indent=1)
    print(f"{PROG}: wrote {os.path.join(out_dir, 'report.md')} ({len(S.runs)} runs, {len(S.warnings)} warnings)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
