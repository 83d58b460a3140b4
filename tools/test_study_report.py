#!/usr/bin/python3
"""Self-test of tools/study_report.py and tools/plot_runs.py on fabricated inputs.

    /usr/bin/python3 tools/test_study_report.py [-v]

Fabricates a study (2 tasks, 3 methods + one deeplora variant, n in {16, 64}, ranks {4, 8}, 3 seeds,
3 lrs, planted values) and two training-run directories in a temp dir, runs both tools and checks
the numbers against a hand computation. Exits non-zero on failure.
"""
import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plot_runs  # noqa: E402
import study_report  # noqa: E402

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

TASKS = ["taskA", "taskB"]
METHODS = ["lora", "lora-noscale", "deeplora"]
NS = [16, 64]
RANKS = [4, 8]
SEEDS = [0, 1, 2]
LRS = [1e-3, 3e-3, 1e-2]
# index into LRS of the lr with the best mean validation accuracy, per (task, method)
BEST = {("taskA", "lora"): 2, ("taskA", "lora-noscale"): 1, ("taskA", "deeplora"): 0,
        ("taskB", "lora"): 1, ("taskB", "lora-noscale"): 2, ("taskB", "deeplora"): 1}
# planted test accuracies at the selected lr: (task, n, rank) -> method -> per seed
PLANTED = {
    ("taskA", 16, 8): {"lora": [0.40, 0.50, 0.45], "deeplora": [0.50, 0.55, 0.60]},  # diffs .10 .05 .15
    ("taskA", 64, 8): {"lora": [0.60, 0.62, 0.58], "deeplora": [0.70, 0.73, 0.70]},  # diffs .10 .11 .12
}
T2, T5 = 4.3027, 2.5706  # t_{0.975} for df 2 and 5


def hand_ci(xs):
    """mean and 95% t-interval, computed longhand."""
    k = len(xs)
    m = sum(xs) / k
    var = sum((x - m) ** 2 for x in xs) / (k - 1)
    t = {3: T2, 6: T5}[k]
    h = t * math.sqrt(var) / math.sqrt(k)
    return m, m - h, m + h


def fabricate(d, variant=True):
    rng = random.Random(1234)
    runs, sel, truth = [], [], {}
    cells = [(t, m, "", n, r) for t in TASKS for m in METHODS for n in NS for r in RANKS]
    if variant:
        cells.append(("taskA", "deeplora", "L=4", 16, 8))
    for (task, method, var, n, rank) in cells:
        best = BEST[(task, method)]
        planted = PLANTED.get((task, n, rank), {}).get(method) if not var else None
        tsel = planted or [round(rng.uniform(0.3, 0.7), 3) for _ in SEEDS]
        truth[(task, method + (f"[{var}]" if var else ""), n, rank)] = tsel
        vals_at_best, grid_tests = [], {}
        for i, lr in enumerate(LRS):
            dist = abs(i - best)
            for s in SEEDS:
                val = round(0.5 - 0.1 * dist + 0.01 * s + (0.02 if method == "deeplora" else 0), 4)
                test = tsel[s] if dist == 0 else round(tsel[s] - 0.04 * dist + rng.uniform(-0.05, 0.05), 3)
                grid_tests.setdefault(lr, []).append(test)
                if dist == 0:
                    vals_at_best.append(val)
                classes = 10 if task == "taskB" else 5  # taskA's options are overridden by study.json
                runs.append({"task": task, "method": method, "variant": var, "n": n, "seed": s, "rank": rank,
                             "lr": lr, "options": {"classes": classes, "gamma": 1.0}, "steps": 100, "batch": 16,
                             "train_loss": 0.1, "val_acc": val, "val_acc_norm": val, "test_acc": test,
                             "test_acc_norm": test, "seconds": 1.5, "n_trainable": 1000 * rank})
        truth[("grid", task, method + (f"[{var}]" if var else ""), n, rank)] = grid_tests
        m = sum(tsel) / 3
        sel.append({"task": task, "method": method, "variant": var, "n": n, "rank": rank, "lr": LRS[best],
                    "lrs": LRS, "val_acc_mean": sum(vals_at_best) / 3, "test_acc_mean": m,
                    "test_acc_std": math.sqrt(sum((x - m) ** 2 for x in tsel) / 2), "seeds": 3})
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "runs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in runs)
    with open(os.path.join(d, "selection.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in sel)
    with open(os.path.join(d, "study.json"), "w") as f:
        json.dump({"base": "gpt2", "tasks": TASKS, "seconds_total": 3600.0,
                   "seconds_by_part": {"fine-tunes": 3000.0, "eval": 600.0}, "base_val_loss": 3.25,
                   "classes": {"taskA": 4}}, f)
    return runs, sel, truth


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_inproc(mod, argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = mod.main(argv)
    return rc, out.getvalue(), err.getvalue()


def md_section(md, title_prefix):
    i = md.index(f"## {title_prefix}")
    j = md.find("\n## ", i + 1)
    return md[i:j if j >= 0 else len(md)]


def table_rows(text):
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


class StudyReportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = os.path.join(cls.tmp.name, "study")
        cls.runs, cls.sel, cls.truth = fabricate(cls.dir)
        cls.out = os.path.join(cls.tmp.name, "out")
        # the CLI, as a user runs it
        p = subprocess.run([PY, os.path.join(HERE, "study_report.py"), cls.dir, "--out", cls.out],
                           capture_output=True, text=True, timeout=120)
        cls.proc = p
        cls.md = read(os.path.join(cls.out, "report.md")) if p.returncode == 0 else ""
        cls.R = json.loads(read(os.path.join(cls.out, "report.json"))) if p.returncode == 0 else {}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_00_ran(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr)

    def test_paired_differences(self):
        got = {(e["a"], e["b"], e["task"], e["n"], e["rank"]): e for e in self.R["paired"]}
        checked = 0
        for b in ("lora", "lora-noscale"):
            for rank in RANKS:
                for n in NS:
                    pooled = []
                    for task in TASKS:
                        da = self.truth[(task, "deeplora", n, rank)]
                        db = self.truth[(task, b, n, rank)]
                        diffs = [x - y for x, y in zip(da, db)]
                        pooled += diffs
                        m, lo, hi = hand_ci(diffs)
                        e = got[("deeplora", b, task, n, rank)]
                        self.assertEqual(e["pairs"], 3)
                        for k, v in (("mean", m), ("lo", lo), ("hi", hi)):
                            self.assertAlmostEqual(e[k], v, places=9, msg=(b, task, n, rank, k))
                        checked += 1
                    m, lo, hi = hand_ci(pooled)
                    e = got[("deeplora", b, "*", n, rank)]
                    self.assertEqual(e["pairs"], 6)
                    for k, v in (("mean", m), ("lo", lo), ("hi", hi)):
                        self.assertAlmostEqual(e[k], v, places=9, msg=("pooled", b, n, rank, k))
        self.assertEqual(checked, 16)
        # the planted cells, as printed: diffs .10 .05 .15 -> interval includes 0; .10 .11 .12 -> excludes 0
        sec = md_section(self.md, "2.")
        row16 = next(r for r in table_rows(sec.split("### deeplora − lora\n")[1].split("###")[0])
                     if r[0] == "taskA" and r[1] == "8")
        self.assertEqual(row16[2], "+10.0 [-2.4, +22.4]")
        self.assertEqual(row16[3], "**+11.0 [+8.5, +13.5]**")
        self.assertIn("### deeplora − deeplora-random\n\nskipped: no runs of deeplora-random", sec)

    def test_split_pairs(self):
        # Variant labels may hold commas ("gamma=1,L=2"); only top-level commas separate pairs.
        self.assertEqual(study_report.split_pairs("a:b, deeplora[gamma=1,L=2]:lora ,c[x]:d[y=1,z=2],"),
                         ["a:b", "deeplora[gamma=1,L=2]:lora", "c[x]:d[y=1,z=2]"])
        self.assertEqual(study_report.split_pairs(""), [])

    def test_t_table(self):
        self.assertEqual(study_report.t975(2), 4.3027)
        self.assertEqual(study_report.t975(5), 2.5706)
        self.assertTrue(2.0211 > study_report.t975(45) > 2.0086)
        self.assertTrue(study_report.t975(10 ** 6) > 1.96)

    def test_selected_lr_table(self):
        want = {(s["task"], study_report.label_of(s["method"], s["variant"]), str(s["rank"]), s["n"]): s["lr"]
                for s in self.sel}
        sec = md_section(self.md, "3.").split("Per method")[0]
        rows = table_rows(sec)
        header = rows[0]
        self.assertEqual(header[:3], ["task", "method", "rank"])
        got = {}
        for r in rows[1:]:
            for h, c in zip(header[3:], r[3:]):
                if c != "–":
                    n = int(h.split("=")[1])
                    got[(r[0], r[1], r[2], n)] = float(c.split()[0])
                    mark = {0: "(min)", 2: "(max)"}.get(LRS.index(min(LRS, key=lambda x: abs(x - float(c.split()[0])))))
                    if mark:
                        self.assertIn(mark, c)
        self.assertEqual(set(got), set(want))
        for k in want:
            self.assertAlmostEqual(got[k], want[k], places=12, msg=k)
        self.assertEqual(len(self.R["selected_lr"]), len(self.sel))

    def test_accuracy_table_and_chance(self):
        sec = md_section(self.md, "1.")
        self.assertIn("main rank 8", sec)  # rank 8 has the variant's extra cell
        a = sec.split("### taskA\n")[1].split("###")[0]
        rows = {r[0]: r for r in table_rows(a)}
        self.assertEqual(rows["method"], ["method", "n=16", "n=64"])
        self.assertEqual(rows["deeplora"][1], "55.0 ± 5.0")  # .50 .55 .60
        self.assertEqual(rows["lora"][2], "60.0 ± 2.0")  # .60 .62 .58
        self.assertIn("deeplora[L=4]", rows)
        self.assertIn("chance: 1/4 = 25.0%", a)  # from study.json "classes"
        self.assertIn("chance: 1/10 = 10.0%", sec.split("### taskB\n")[1])  # from the options

    def test_spread(self):
        for lab in ("lora", "deeplora"):
            spreads = []
            for task in TASKS:
                for n in NS:
                    for rank in RANKS:
                        g = self.truth[("grid", task, lab, n, rank)]
                        means = sorted(sum(v) / 3 for v in g.values())
                        spreads.append(means[-1] - means[1])
            self.assertAlmostEqual(self.R["spread"][lab]["spread"], sum(spreads) / len(spreads), places=9)

    def test_header_variants_figures(self):
        md = self.md
        self.assertIn(f"runs: {len(self.runs)} fine-tunes", md)
        self.assertIn(study_report.SELECTION_RULE, md)
        self.assertIn("seeds: 3 (0, 1, 2)", md)
        self.assertIn("| seconds_total | 3600.0 (60.0 min) |", md)
        self.assertIn("| fine-tunes | 3000.0 |", md)
        self.assertIn("| base_val_loss | 3.25 |", md)
        self.assertNotIn("## Warnings", md)
        sec = md_section(md, "7.")
        self.assertIn("deeplora[L=4]", sec)
        self.assertIn("Δ", sec)
        for name in ("acc_vs_n.png", "acc_vs_rank.png", "acc_vs_lr.png"):
            p = os.path.join(self.out, name)
            self.assertTrue(os.path.isfile(p), name)
            self.assertGreater(os.path.getsize(p), 5000, name)
            with open(p, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertIn(f"]({name})", md)

    def test_fewer_seeds_warning_and_missing_selection(self):
        with tempfile.TemporaryDirectory() as t:
            d = os.path.join(t, "s")
            fabricate(d, variant=False)
            lines = read(os.path.join(d, "runs.jsonl")).splitlines()
            write(os.path.join(d, "runs.jsonl"), "\n".join(lines[:-1]) + "\n")
            os.remove(os.path.join(d, "selection.jsonl"))
            rc, _, err = run_inproc(study_report, [d])
            self.assertEqual(rc, 0, err)
            md = read(os.path.join(d, "report.md"))
            self.assertIn("## Warnings", md)
            self.assertIn("taskB/deeplora/n=64/r=8: fewer seeds than the 3 of other cells at some lrs (lr=1e-2: 2)", md)
            self.assertIn("selection.jsonl is missing", md)
            self.assertIn("No variants", md)

    def test_bad_input(self):
        with tempfile.TemporaryDirectory() as t:
            d = os.path.join(t, "s")
            fabricate(d, variant=False)
            lines = read(os.path.join(d, "runs.jsonl")).splitlines()
            bad = json.loads(lines[6])
            del bad["test_acc"]
            lines[6] = json.dumps(bad)
            write(os.path.join(d, "runs.jsonl"), "\n".join(lines) + "\n")
            rc, _, err = run_inproc(study_report, [d])
            self.assertEqual(rc, 2)
            self.assertIn('runs.jsonl:7: missing field "test_acc"', err)
            self.assertEqual(len(err.strip().splitlines()), 1)
            with open(os.path.join(d, "selection.jsonl"), "a") as f:
                f.write('{"task": "taskA", "method": "lora", "n": "many"}\n')
            lines[6] = json.dumps({**bad, "test_acc": 0.5})
            write(os.path.join(d, "runs.jsonl"), "\n".join(lines) + "\n")
            rc, _, err = run_inproc(study_report, [d])
            self.assertEqual(rc, 2)
            self.assertRegex(err, r'selection\.jsonl:\d+: field "n" should be an integer')


CONFIG_A = """# deeplora train
model="models/gpt2"
data="[data/a.txt,data/b.txt]"

# peak learning rate
lr=0.001
rank=8
wide=false
seed=0
out="runs/a"
"""
# not valid TOML (unquoted string): read by the line parser
CONFIG_B = """model=models/gpt2
data="[data/a.txt,data/b.txt]"
lr=0.01   # comment
rank=16
wide=false
seed=0
out="runs/b"
"""


def make_run(d, config, n_steps, lr, with_acc, bad_line=False, trainer_summary=False):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.toml"), "w") as f:
        f.write(config)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s in range(1, n_steps + 1):
            f.write(json.dumps({"step": s, "loss": 3.0 * math.exp(-s * lr * 5) + 0.1 * math.sin(s), "lr": lr,
                                "grad_norm": 1.0, "tokens_per_s": 5e4, "mfu": 0.0}) + "\n")
            if bad_line and s == 2:
                f.write('{"step": 3, "loss": \n')
            if s % 20 == 0:
                row = {"step": s, "val_loss": 3.0 * math.exp(-s * lr * 4) + 0.2, "sample": "hello"}
                if with_acc:
                    row.update(val_acc=0.3 + s / 1000, val_acc_norm=0.28 + s / 1000)
                f.write(json.dumps(row) + "\n")
    if trainer_summary:  # what models/trainer.cpp writes
        summary = {"final_step": n_steps, "final_loss": 0.5, "tokens_per_s": 5e4, "seconds": 12.5, "n_trainable": 10,
                   "gpu_memory": {"allocator_peak_bytes": 3 * 2**30, "allocator_reserved_bytes": 4 * 2**30}}
    else:  # the format of the brief
        summary = {"final_step": n_steps, "final_loss": 0.5, "best_val_acc": None, "peak_gpu_mem_bytes": 3 * 2**30,
                   "seconds": 12.5}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f)


class PlotRunsTest(unittest.TestCase):
    def test_two_runs(self):
        with tempfile.TemporaryDirectory() as t:
            a, b = os.path.join(t, "runs", "a"), os.path.join(t, "runs", "b")
            make_run(a, CONFIG_A, 120, 1e-3, with_acc=True, bad_line=True)
            make_run(b, CONFIG_B, 100, 1e-2, with_acc=False, trainer_summary=True)
            png = os.path.join(t, "curves.png")
            p = subprocess.run([PY, os.path.join(HERE, "plot_runs.py"), a, b, "-o", png],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(f"{os.path.join(a, 'metrics.jsonl')}:3:", p.stderr)  # the malformed line, by number
            self.assertTrue(os.path.isfile(png) and os.path.getsize(png) > 5000)
            rows = table_rows(p.stdout)
            self.assertEqual(rows[0], ["run", "lr", "rank", "final train loss", "last val loss", "best val loss",
                                       "last val acc", "best val acc", "steps", "seconds", "peak GiB"])
            self.assertEqual([r[0] for r in rows[1:]], ["a", "b"])
            self.assertEqual(rows[1][1:3], ["0.001", "8"])
            self.assertEqual(rows[2][1:3], ["0.01", "16"])
            self.assertEqual(rows[1][6], "0.42")  # last val acc at step 120
            self.assertEqual(rows[2][6], "–")
            self.assertEqual(rows[1][8], "120")
            self.assertEqual(rows[2][9], "12.5")
            self.assertEqual([r[10] for r in rows[1:]], ["3", "3"])

    def test_names_and_errors(self):
        self.assertEqual(plot_runs.run_names(["x/r1/out", "y/r2/out", "z/r3"]), ["r1/out", "r2/out", "r3"])
        with tempfile.TemporaryDirectory() as t:
            rc, _, err = run_inproc(plot_runs, [t, "--no-plot"])
            self.assertEqual(rc, 2)
            self.assertEqual(err.strip(), f"plot_runs: error: {t}: no metrics.jsonl")
            write(os.path.join(t, "metrics.jsonl"), "garbage\n")
            rc, _, err = run_inproc(plot_runs, [t, "--no-plot"])
            self.assertEqual(rc, 2)
            self.assertIn("no usable rows", err)
        cfg = plot_runs.parse_config_lines('a=1\nb="x # y" # c\nc=[1, 2]\n[sec]\nd=true\n')
        self.assertEqual(cfg, {"a": 1, "b": "x # y", "c": [1, 2], "sec.d": True})


if __name__ == "__main__":
    unittest.main(verbosity=2 if "-v" in sys.argv else 1, argv=[sys.argv[0]])
