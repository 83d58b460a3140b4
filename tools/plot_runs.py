#!/usr/bin/python3
"""Plot and compare training runs written by `train --out DIR`.

    tools/plot_runs.py RUN_DIR [RUN_DIR ...] [-o curves.png] [--table] [--no-plot]

Each RUN_DIR holds metrics.jsonl (step rows {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...}
and eval rows {"step", "val_loss", "val_acc", "val_acc_norm", "sample"}), optionally config.toml
(the resolved options, CLI11's key=value format) and summary.json ({"final_step", "final_loss",
"seconds", "best_val_acc" or "best": {"metric", "value"}, "peak_gpu_mem_bytes" or
"gpu_memory": {"allocator_peak_bytes"}}).

Writes one PNG with the panels that some run has data for: train loss vs step (raw, light, plus an
EMA-smoothed line), val loss vs step, val accuracy vs step (val_acc solid, val_acc_norm dashed).
One colour per run; runs are named by their directory name (or the shortest path suffix that tells
them apart). With --table, or by default when more than one run is given, prints a markdown table:
one row per run, the options whose values differ between the runs (`out` is left out: it is the
run directory; see --ignore), then final train loss, last/best val loss, last/best val acc, steps
and seconds.

Malformed metrics lines are skipped with a warning naming file:line. A missing or empty
metrics.jsonl, or an unreadable config.toml / summary.json, is an error: one line on stderr, exit 2.
Needs Debian's python3-matplotlib and python3-numpy (run with /usr/bin/python3).
"""
import argparse
import json
import math
import os
import re
import sys

PROG = "plot_runs"


class InputError(Exception):
    pass


def warn(msg):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------- reading

def _num(v):
    """A JSON value as a float; None (nlohmann writes NaN as null) and non-numbers become NaN."""
    if isinstance(v, bool) or v is None:
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    return math.nan


def read_metrics(path):
    """Returns (train, evals): lists of dicts sorted by step. Malformed lines are skipped with a warning."""
    if not os.path.isfile(path):
        raise InputError(f"{os.path.dirname(path) or '.'}: no metrics.jsonl")
    train, evals = [], []
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}")
    with f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            try:
                row = json.loads(s)
            except json.JSONDecodeError as e:
                warn(f"{path}:{lineno}: not JSON ({e.msg}); skipped")
                continue
            if not isinstance(row, dict):
                warn(f"{path}:{lineno}: not a JSON object; skipped")
                continue
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                warn(f"{path}:{lineno}: no numeric \"step\"; skipped")
                continue
            if "loss" in row:
                train.append({"step": step, "loss": _num(row.get("loss")), "lr": _num(row.get("lr")),
                              "tokens_per_s": _num(row.get("tokens_per_s"))})
            elif any(k in row for k in ("val_loss", "val_acc", "val_acc_norm")):
                evals.append({"step": step, "val_loss": _num(row.get("val_loss")),
                              "val_acc": _num(row.get("val_acc")), "val_acc_norm": _num(row.get("val_acc_norm"))})
            elif "sample" not in row:
                warn(f"{path}:{lineno}: neither a step row (\"loss\") nor an eval row (\"val_*\"); skipped")
    if not train and not evals:
        raise InputError(f"{path}: no usable rows")
    train.sort(key=lambda r: r["step"])
    evals.sort(key=lambda r: r["step"])
    return train, evals


_BARE_NUM = re.compile(r"^[+-]?(\d[\d_]*)?(\.\d*)?([eE][+-]?\d+)?$")


def _parse_scalar(v):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        inner = v[1:-1]
        if v[0] == '"':
            inner = inner.replace('\\"', '"').replace("\\\\", "\\")
        return inner
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if v and _BARE_NUM.match(v) and any(c.isdigit() for c in v):
        try:
            return int(v.replace("_", "")) if re.match(r"^[+-]?[\d_]+$", v) else float(v.replace("_", ""))
        except ValueError:
            pass
    if low in ("nan", "+nan", "-nan", "inf", "+inf", "-inf"):
        return float(low)
    if v.startswith("[") and v.endswith("]"):
        body = v[1:-1].strip()
        return [_parse_scalar(x) for x in body.split(",")] if body else []
    return v


def _strip_comment(line):
    out, quote = [], None
    for c in line:
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        out.append(c)
    return "".join(out)


def parse_config_lines(text):
    """Fallback for config files tomllib rejects: flat key=value lines, [section] prefixes keys."""
    cfg, section = {}, ""
    for raw in text.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]") and "=" not in line:
            section = line.strip("[]").strip()
            continue
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        k = k.strip().strip("\"'")
        cfg[f"{section}.{k}" if section else k] = _parse_scalar(v)
    return cfg


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_config(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}")
    try:
        import tomllib
        return _flatten(tomllib.loads(data.decode("utf-8", errors="replace")))
    except Exception:  # tomllib.TOMLDecodeError, or no tomllib
        return parse_config_lines(data.decode("utf-8", errors="replace"))


def read_summary(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({getattr(e, 'msg', e)})")
    if not isinstance(s, dict):
        raise InputError(f"{path}: not a JSON object")
    return s


def run_names(dirs):
    """The directory name, or the shortest trailing path suffix that is unique among the runs."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in dirs]
    names = [None] * len(dirs)
    depth = 1
    while any(n is None for n in names):
        cand = ["/".join(p[-depth:]) for p in parts]
        for i, c in enumerate(cand):
            if names[i] is None and (cand.count(c) == 1 or depth >= len(parts[i])):
                names[i] = c
        depth += 1
    # the same directory given twice: number the copies
    for i, n in enumerate(names):
        if names.count(n) > 1:
            names[i] = f"{n}#{names[:i].count(n) + 1}"
    return names


def load_run(d):
    if not os.path.isdir(d):
        raise InputError(f"{d}: not a directory")
    train, evals = read_metrics(os.path.join(d, "metrics.jsonl"))
    return {"dir": d, "train": train, "evals": evals, "config": read_config(os.path.join(d, "config.toml")),
            "summary": read_summary(os.path.join(d, "summary.json"))}


# ----------------------------------------------------------------------------------------- summary

def _finite(xs):
    return [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def run_stats(run):
    tr, ev, sm = run["train"], run["evals"], run["summary"]
    st = {}
    losses = [r["loss"] for r in tr if math.isfinite(r["loss"])]
    st["final train loss"] = losses[-1] if losses else _num(sm.get("final_loss"))
    vl = _finite(r["val_loss"] for r in ev)
    st["last val loss"] = vl[-1] if vl else math.nan
    st["best val loss"] = min(vl) if vl else math.nan
    va = _finite(r["val_acc"] for r in ev)
    st["last val acc"] = va[-1] if va else math.nan
    best = sm.get("best") if isinstance(sm.get("best"), dict) else {}
    st["best val acc"] = max(va) if va else _num(sm.get("best_val_acc", best.get("value") if best.get("metric") == "acc"
                                                      else sm.get("val_acc")))
    steps = _num(sm.get("final_step"))
    if not math.isfinite(steps):
        all_steps = [r["step"] for r in tr] + [r["step"] for r in ev]
        steps = max(all_steps) if all_steps else math.nan
    st["steps"] = steps
    st["seconds"] = _num(sm.get("seconds"))
    gm = sm.get("gpu_memory") if isinstance(sm.get("gpu_memory"), dict) else {}
    mem = _num(sm.get("peak_gpu_mem_bytes", gm.get("allocator_peak_bytes")))
    st["peak GiB"] = mem / 2**30 if math.isfinite(mem) else math.nan
    return st


def _canon(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return json.dumps(v, sort_keys=True)


def differing_options(configs, ignore=("out",)):
    keys = sorted(set().union(*[c.keys() for c in configs])) if configs else []
    diff = []
    for k in keys:
        if k in ignore:
            continue
        vals = {_canon(c[k]) if k in c else "\0missing" for c in configs}
        if len(vals) > 1:
            diff.append(k)
    return diff


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–" if math.isnan(v) else str(v)
        if v == int(v) and abs(v) < 1e7:
            return str(int(v))
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v).replace("|", "\\|")


STAT_COLS = ["final train loss", "last val loss", "best val loss", "last val acc", "best val acc", "steps", "seconds"]


def table(runs, names, ignore=("out",)):
    diff = differing_options([r["config"] for r in runs], ignore)
    stats = [run_stats(r) for r in runs]
    cols = list(STAT_COLS)
    if any(math.isfinite(s["peak GiB"]) for s in stats):
        cols.append("peak GiB")
    # drop metric columns that no run has
    cols = [c for c in cols if any(math.isfinite(s[c]) for s in stats)]
    header = ["run"] + diff + cols
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, r, s in zip(names, runs, stats):
        cells = [name] + [_fmt(r["config"].get(k)) for k in diff] + [_fmt(s[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), diff


# ------------------------------------------------------------------------------------------- plots

def ema(xs, span):
    """Debiased exponential moving average that skips NaNs."""
    import numpy as np
    beta = 1.0 - 1.0 / max(span, 1.0)
    out = np.full(len(xs), np.nan)
    m, w = 0.0, 0.0
    for i, x in enumerate(xs):
        if math.isfinite(x):
            m = beta * m + (1 - beta) * x
            w = beta * w + (1 - beta)
        if w > 0:
            out[i] = m / w
    return out


def plot(runs, names, out, title=None, smooth=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has = {
        "train": any(r["train"] for r in runs),
        "val_loss": any(math.isfinite(e["val_loss"]) for r in runs for e in r["evals"]),
        "val_acc": any(math.isfinite(e["val_acc"]) or math.isfinite(e["val_acc_norm"]) for r in runs for e in r["evals"]),
    }
    panels = [k for k in ("train", "val_loss", "val_acc") if has[k]]
    if not panels:
        raise InputError("no run has train loss, val loss or val accuracy to plot")
    width = 5.2 * len(panels) + 0.4
    longest = max(len(n) for n in names)
    below = len(runs) > 4 or longest > 28  # one legend under the panels, else in the first panel
    ncol = max(1, min(len(runs), int(width * 72 / (longest * 4.8 + 40)))) if below else 1
    leg_rows = math.ceil(len(runs) / ncol) if below else 0
    height = 4.3 + (0.2 * leg_rows + 0.15 if below else 0) + (0.35 if title else 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    norm_dashed = False
    for i, (r, name) in enumerate(zip(runs, names)):
        c = colors[i % len(colors)]
        if "train" in axes and r["train"]:
            ax = axes["train"]
            st = [t["step"] for t in r["train"]]
            lo = [t["loss"] for t in r["train"]]
            span = smooth if smooth else max(1.0, len(lo) / 25.0)
            if span > 1.5:
                ax.plot(st, lo, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(st, ema(lo, span), color=c, linewidth=1.6, label=name)
            else:
                ax.plot(st, lo, color=c, linewidth=1.4, label=name)
        ev = r["evals"]
        if "val_loss" in axes:
            pts = [(e["step"], e["val_loss"]) for e in ev if math.isfinite(e["val_loss"])]
            if pts:
                axes["val_loss"].plot(*zip(*pts), color=c, marker="o", markersize=3, linewidth=1.4, label=name)
        if "val_acc" in axes:
            pts = [(e["step"], e["val_acc"]) for e in ev if math.isfinite(e["val_acc"])]
            if pts:
                axes["val_acc"].plot(*zip(*pts), color=c, marker="o", markersize=3, linewidth=1.4, label=name)
            pts = [(e["step"], e["val_acc_norm"]) for e in ev if math.isfinite(e["val_acc_norm"])]
            if pts:
                norm_dashed = True
                axes["val_acc"].plot(*zip(*pts), color=c, linestyle="--", linewidth=1.0, alpha=0.8,
                                     label=None if any(math.isfinite(e["val_acc"]) for e in ev) else name)
    titles = {"train": "train loss (light: raw, line: EMA)", "val_loss": "validation loss",
              "val_acc": "validation accuracy" + (" (dashed: length-normalized)" if norm_dashed else "")}
    ylabels = {"train": "loss", "val_loss": "loss", "val_acc": "accuracy"}
    for k, ax in axes.items():
        ax.set_title(titles[k], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabels[k])
        ax.grid(True, alpha=0.3)
    handles, labels = {}, []
    for ax in axes.values():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
    labels = [n for n in names if n in handles]
    bottom = 0.0
    if below:
        fig.legend([handles[n] for n in labels], labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        bottom = (0.2 * leg_rows + 0.15) / height
    else:
        axes[panels[0]].legend([handles[n] for n in labels], labels, fontsize=8)
    top = 1.0
    if title:
        fig.suptitle(title)
        top = 1 - 0.35 / height
    fig.tight_layout(rect=(0, bottom, 1, top))
    fig.savefig(out, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train --out)")
    ap.add_argument("-o", "--out", default="curves.png", help="output PNG (default curves.png)")
    ap.add_argument("--table", action="store_true", help="print the markdown comparison table (default with >1 run)")
    ap.add_argument("--no-plot", action="store_true", help="only the table, no PNG")
    ap.add_argument("--title", default=None, help="figure title")
    ap.add_argument("--smooth", type=float, default=None,
                    help="EMA span in logged steps for the train loss (default: a 25th of the points)")
    ap.add_argument("--ignore", default="out",
                    help="comma-separated options never shown as differing (default: out, the run directory)")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.runs]
        names = run_names(args.runs)
        if not args.no_plot:
            plot(runs, names, args.out, args.title, args.smooth)
            print(f"{PROG}: wrote {args.out}", file=sys.stderr)
        if args.table or len(runs) > 1:
            print(table(runs, names, tuple(x for x in args.ignore.split(",") if x))[0])
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
