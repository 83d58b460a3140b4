#!/usr/bin/python3
"""English pretraining corpus from Debian packages (stdlib only; run with /usr/bin/python3).

Writes data/corpus/base/NNN-<source>.txt (shards of about 4 MB; each shard holds whole source units
separated by blank lines) and data/corpus/base/MANIFEST.json. Sources, in this order:

  debian    package synopses + long descriptions from the apt lists (one unit per distinct description)
  python    python3.X-doc reST sources (html/_sources/**/*.rst.txt), markup stripped (one unit per file)
  perl      perl-doc's pod files (usr/share/perl/5.*/pod/*.pod), pod markup stripped (one unit per file)
  wordnet   WordNet 3.0 glosses with lemmas and examples, all parts of speech, in dictionary order
  licenses  base-files' /usr/share/common-licenses (one unit per license)

Exclusion: nothing of a task's val or test split may reach the corpus. Source units that a val/test example
came from are dropped (Debian source packages of debian_section's val/test examples, the WordNet synsets of
wordnet_lexname's, the API entries of python_docs'), then every paragraph in which the normalized text of a
val/test prompt occurs is dropped (normalized = the sequence of lowercased \\w+ words, so case,
whitespace, punctuation and markup do not matter). After writing, every file is read back and checked for
every val/test text; the script fails if one occurs. A self-test of the matcher runs first.

  /usr/bin/python3 tools/build_corpus.py           # data/corpus/base (skips when up to date)
  /usr/bin/python3 tools/build_corpus.py --tiny    # data/corpus/base-tiny (~1.3 MB: every k-th unit of each source)
"""
import argparse
import collections
import glob
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tasks as mt  # noqa: E402  (shared extraction + normalization)

REPO = mt.REPO
FORMAT_VERSION = 1
SHARD_BYTES = 4 << 20
TINY_BYTES_PER_SOURCE = 320 << 10
SOURCES = ("debian", "python", "perl", "wordnet", "licenses")


# ---------------------------------------------------------------- exclusion index
class Excluder:
    """Exact word-sequence matcher for the val/test texts (every text has >= mt.MIN_WORDS words)."""

    K = mt.MIN_WORDS

    def __init__(self, texts):
        self.first = collections.defaultdict(list)
        self.n = 0
        for t in sorted(set(texts)):
            w = tuple(mt.norm_words(t))
            if len(w) < self.K:
                raise SystemExit(f"build_corpus: excluded text shorter than {self.K} words: {t!r}")
            self.first[w[: self.K]].append(w)
            self.n += 1

    def matches(self, words):
        """[(start word index, end word index, text words)] of every occurrence in a word list."""
        out, K = [], self.K
        if len(words) < K:
            return out
        first = self.first
        for i, g in enumerate(zip(*(words[j:] for j in range(K)))):
            cands = first.get(g)
            if cands:
                for w in cands:
                    if len(w) == K or tuple(words[i : i + len(w)]) == w:
                        out.append((i, i + len(w), w))
        return out

    def find(self, text):
        return self.matches(mt.norm_words(text))

    def scrub(self, text, sep=r"\n[ \t]*\n"):
        """Drops every paragraph (blank-line separated block) that holds part of an occurrence.
        Returns (text, paragraphs dropped)."""
        dropped = 0
        while True:
            spans = [(m.start(), m.end()) for m in mt.WORD_RE.finditer(text)]
            hits = self.matches([text[a:b].lower() for a, b in spans])
            if not hits:
                return text, dropped
            paras, pos = [], 0
            for m in re.finditer(sep, text):
                paras.append((pos, m.start()))
                pos = m.end()
            paras.append((pos, len(text)))
            kill = set()
            for i, j, _ in hits:
                a, b = spans[i][0], spans[j - 1][1]
                for k, (pa, pb) in enumerate(paras):
                    if pa < b and a < pb:
                        kill.add(k)
            dropped += len(kill)
            text = ("\n" if sep == r"\n" else "\n\n").join(
                text[pa:pb] for k, (pa, pb) in enumerate(paras) if k not in kill and text[pa:pb].strip())


def self_test(ex, texts):
    """The matcher finds a val/test text whatever its case, spacing, punctuation or markup, also across a
    line break, and scrub() removes exactly the paragraphs concerned."""
    assert texts, "no excluded texts"
    t = texts[len(texts) // 2]
    words = mt.norm_words(t)
    mangled = "\n".join(("**" + w.upper() + "**," if i % 3 == 0 else w) for i, w in enumerate(words))
    doc = f"First paragraph stays.\n\nIntro {mangled} tail.\n\nLast paragraph stays."
    assert ex.find(doc), "self-test: a mangled copy was not found"
    clean, n = ex.scrub(doc)
    assert n == 1 and clean == "First paragraph stays.\n\nLast paragraph stays.", f"self-test: scrub gave {clean!r}"
    split = f"A {' '.join(words[:2])}\n\n{' '.join(words[2:])} b.\n\nkeep me"
    assert ex.find(split) and ex.scrub(split) == ("keep me", 2), "self-test: cross-paragraph occurrence"
    near = " ".join(words[:-1]) + " zzzqx"
    assert not ex.find(near), "self-test: a text missing its last word must not match"
    assert not ex.find("unrelated text about nothing in particular at all"), "self-test: false positive"


# ---------------------------------------------------------------- sources
def reflow(lines):
    return " ".join(l.strip() for l in lines if l.strip())


def debian_units(lists_dir, excl_packages):
    pkgs, inputs = mt.load_debian_descriptions(lists_dir)
    seen, units = set(), []
    for name in sorted(pkgs):
        d = pkgs[name]
        if name in excl_packages:
            continue
        key = mt.norm_key(d["synopsis"] + " " + " ".join(d["paras"]))
        if key in seen:
            continue
        seen.add(key)
        body = []
        for p in d["paras"]:
            out, run = [], []
            for l in p.split("\n"):
                if l.startswith(" "):  # verbatim line (lists, tables)
                    if run:
                        out.append(reflow(run))
                        run = []
                    out.append(l.rstrip())
                else:
                    run.append(l)
            if run:
                out.append(reflow(run))
            body.append("\n".join(out))
        units.append(f"{name}: {d['synopsis']}\n" + "\n\n".join(body))
    return units, inputs


RST_DROP = {"index", "toctree", "highlight", "module", "currentmodule", "moduleauthor", "sectionauthor", "testsetup",
            "testcleanup", "raw", "include", "literalinclude", "image", "figure", "tabularcolumns", "audit-event",
            "autoclass", "autofunction", "automodule", "csv-table", "list-table", "rubric", "default-role", "role",
            "c:namespace", "c:namespace-push", "c:namespace-pop", "limited-api-list", "miscnews", "include-only"}
RST_CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "productionlist",
            "parsed-literal", "literal"}
RST_LABEL = {"note": "Note:", "warning": "Warning:", "important": "Important:", "tip": "Tip:", "caution": "Caution:",
             "attention": "Attention:", "danger": "Danger:", "hint": "Hint:", "seealso": "See also:",
             "versionadded": "New in version", "versionchanged": "Changed in version", "deprecated": "Deprecated since version",
             "deprecated-removed": "Deprecated since version", "impl-detail": "CPython implementation detail:",
             "availability": "Availability:"}
DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
LIST_ITEM_RE = re.compile(r"^\s*([*+-]|#\.|\d+\.|\(?[a-z\d]\))\s+\S")
UNDERLINE_RE = re.compile(r"^\s*([=\-~^\"*#+'`_.:<>])\1{2,}\s*$")


def indent_of(l):
    return len(l) - len(l.lstrip())


def rst_to_text(lines):
    """Light reST -> text: headings kept without their rules, prose reflowed and inline markup removed,
    literal/code blocks kept verbatim (dedented), indexes/targets/comments/toctrees dropped."""
    out, para = [], []
    i, n = 0, len(lines)

    def flush():
        if para:
            t = mt.rst_inline(reflow(para))
            t = re.sub(r"\s*::$", ":", t)
            if t.strip(": "):
                out.append(t)
            para.clear()

    def block_end(start, ind):
        j = start
        while j < n and (not lines[j].strip() or indent_of(lines[j]) > ind):
            j += 1
        return j

    def literal(start, stop):
        blk = [l.rstrip() for l in lines[start:stop]]
        while blk and not blk[0].strip():
            blk.pop(0)
        while blk and not blk[-1].strip():
            blk.pop()
        if blk:
            base = min(indent_of(l) for l in blk if l.strip())
            out.append("\n".join(l[base:] for l in blk))

    while i < n:
        l = lines[i]
        s = l.strip()
        if not s:
            flush()
            i += 1
            continue
        ind = indent_of(l)
        if UNDERLINE_RE.match(l) or re.match(r"^\s*[+|][-=+|]*[+|]\s*$", l):
            flush()
            i += 1
            continue
        m = DIRECTIVE_RE.match(l)
        if m:
            flush()
            name, arg = m.group(2).lower(), m.group(3).strip()
            end = block_end(i + 1, ind)
            k = i + 1  # options and argument continuation lines up to the first blank line
            while k < end and lines[k].strip():
                if not mt.RST_FIELD.match(lines[k].strip()):
                    arg += " " + lines[k].strip()
                k += 1
            if name in RST_DROP:
                i = end
            elif name in ("only", "container", "cssclass"):
                i = k  # keep the content, not the argument
            elif name in RST_CODE:
                literal(k, end)
                i = end
            elif name in RST_LABEL:
                arg = mt.squash(mt.rst_inline(arg))
                if name.startswith(("version", "deprecated")) and arg:
                    ver, _, rest = arg.partition(" ")
                    out.append(f"{RST_LABEL[name]} {ver}" + (f": {rest}" if rest else "."))
                else:
                    out.append((RST_LABEL[name] + " " + arg).strip())
                i = k
            else:  # API and other directives: keep the argument (a signature, a title), then the content
                if arg:
                    out.append(mt.rst_inline(arg))
                i = k
            continue
        if s.startswith(".."):  # comment, target or substitution definition
            flush()
            i = block_end(i + 1, ind)
            continue
        if s == "::":
            flush()
            end = block_end(i + 1, ind)
            literal(i + 1, end)
            i = end
            continue
        if s.startswith(">>>"):
            flush()
            j = i
            while j < n and lines[j].strip():
                j += 1
            literal(i, j)
            i = j
            continue
        if para:
            p0 = indent_of(para[0])
            item0 = LIST_ITEM_RE.match(para[0]) or mt.RST_FIELD.match(para[0].strip())
            if (ind != p0 and not (item0 and ind > p0)) or (ind == p0 and LIST_ITEM_RE.match(l)):
                flush()
        para.append(l)
        if s.endswith("::"):
            flush()
            end = block_end(i + 1, ind)
            literal(i + 1, end)
            i = end
            continue
        i += 1
    flush()
    text = "\n\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def python_units(root, excl_refs):
    src = mt.python_sources(root)
    units, removed = [], 0
    for path in sorted(glob.glob(os.path.join(src, "**", "*.rst.txt"), recursive=True)):
        rel = os.path.relpath(path, src)[: -len(".txt")]
        lines = open(path, encoding="utf-8").read().splitlines()
        if rel.startswith("library/"):
            f = rel[len("library/"):]
            drop = set()
            for e in mt.python_entries(path):
                if f"library/{f}:{e['start'] + 1}" in excl_refs:
                    drop.update(range(e["start"], e["stop"]))
                    removed += 1
            lines = [l if k not in drop else "" for k, l in enumerate(lines)]
        t = rst_to_text(lines)
        if t:
            units.append(t)
    return units, removed


POD_ENT = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'", "nbsp": " "}


def pod_inline(t):
    def code(c, body):
        if c in "XZ":
            return ""
        if c == "E":
            if body in POD_ENT:
                return POD_ENT[body]
            try:
                return chr(int(body, 16) if body.lower().startswith("0x") else int(body))
            except ValueError:
                return body
        if c == "L":
            if "|" in body:
                return body.split("|", 1)[0]
            if re.match(r"^\w+://", body):
                return body
            page, _, sec = body.partition("/")
            sec = sec.strip('"')
            return f'"{sec}" in {page}' if page and sec else (sec or page)
        return body

    for k in (4, 3, 2):
        t = re.sub(r"([A-Z])<{%d}\s+(.*?)\s+>{%d}" % (k, k), lambda m: code(m.group(1), m.group(2)), t, flags=re.S)
    while True:
        t2 = re.sub(r"([A-Z])<([^<>]*)>", lambda m: code(m.group(1), m.group(2)), t)
        if t2 == t:
            return t
        t = t2


def pod_to_text(text):
    out, skip_until = [], None
    for block in re.split(r"\n[ \t]*\n", text.replace("\r", "")):
        if not block.strip():
            continue
        if skip_until:
            if re.match(r"^=end\s+" + re.escape(skip_until), block.strip()):
                skip_until = None
            continue
        if block.startswith("="):
            cmd, _, rest = block.partition(" ")
            rest = reflow(rest.split("\n"))
            if cmd.startswith("=head"):
                out.append(pod_inline(rest))
            elif cmd == "=item":
                out.append(pod_inline(rest) if rest not in ("*", "") else "*")
            elif cmd == "=begin":
                skip_until = rest.split()[0] if rest else ""
            continue  # =over =back =cut =pod =encoding =for
        if block[0] in " \t":
            lines = block.split("\n")
            base = min(indent_of(l) for l in lines if l.strip())
            out.append("\n".join(l[base:].rstrip() for l in lines))
        else:
            p = pod_inline(reflow(block.split("\n")))
            if out and out[-1] == "*":
                out[-1] = "* " + p
            else:
                out.append(p)
    return "\n\n".join(o for o in out if o != "*")


def perl_units(root):
    units = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/perl/5.*/pod/*.pod"))):
        t = pod_to_text(open(path, encoding="utf-8", errors="replace").read())
        if t:
            units.append(t)
    if not units:
        raise SystemExit("build_corpus: no perl pods under data/debian/root (perl-doc not extracted)")
    return units


def wordnet_units(root, excl_refs):
    entries = []
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for s in mt.wordnet_synsets(root):
        if s["pos"][0] + s["offset"] in excl_refs:
            continue
        line = f"{', '.join(s['words'])} ({pos_name[s['pos']]}): {s['definition']}"
        if s["examples"]:
            line += "; " + "; ".join(f'"{e}"' for e in s["examples"])
        entries.append((s["words"][0].lower(), s["pos"], s["offset"], line))
    entries.sort()
    return [e[3] for e in entries]


def license_units(root):
    units = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/common-licenses/*"))):
        if os.path.isfile(path) and not os.path.islink(path):
            units.append(open(path, encoding="utf-8", errors="replace").read().strip())
    return units


# ---------------------------------------------------------------- writing
def clean_unit(t):
    t = t.replace("\r", "").replace("\x00", "")
    t = re.sub(r"[ \t]+\n", "\n", t)
    t = re.sub(r"([^\w\s])\1{15,}", lambda m: m.group(1) * 3, t)  # long runs of one symbol
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def write_source(out_dir, source, units, ex, shard_bytes, limit=None, joiner="\n\n"):
    """Scrubs units, packs them into shards, scrubs each shard again (cross-unit occurrences), writes.
    Units are joined by blank lines (one line per unit for WordNet: joiner "\n")."""
    sep = r"\n" if joiner == "\n" else r"\n[ \t]*\n"
    shards, cur, size, stats = [], [], 0, collections.Counter()
    if limit is not None:  # tiny: every k-th unit, spread over the whole source
        total = sum(len(u.encode("utf-8")) for u in units)
        units = units[:: max(1, total // limit)]
    for u in units:
        u = clean_unit(u)
        if not u:
            continue
        b = len(u.encode("utf-8")) + len(joiner)
        if limit is not None and size + b > limit and cur:
            break
        if limit is None and cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += b
        stats["units"] += 1
    if cur:
        shards.append(cur)
    files = []
    for k, sh in enumerate(shards):
        text, d = ex.scrub(joiner.join(sh), sep)
        stats["paragraphs_dropped"] += d
        name = f"{source}.txt" if limit is not None else f"{k:03d}-{source}.txt"
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        files.append(name)
    return files, stats


def verify(out_dir, files, ex):
    """Reads every file back; fails if any val/test text occurs."""
    bad = []
    for name in files:
        text = open(os.path.join(out_dir, name), encoding="utf-8").read()
        for i, j, w in ex.find(text):
            bad.append((name, " ".join(w)[:120]))
    if bad:
        for b in bad[:20]:
            print(f"build_corpus: EXCLUSION FAILED: {b[0]}: {b[1]!r}", file=sys.stderr)
        raise SystemExit(f"build_corpus: {len(bad)} val/test texts occur in the corpus")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(REPO, "data/debian/root"))
    ap.add_argument("--debs", default=os.path.join(REPO, "data/debian/debs"))
    ap.add_argument("--apt-lists", default=os.path.join(REPO, "data/debian/apt/lists"))
    ap.add_argument("--tasks", default=os.path.join(REPO, "data/tasks"), help="make_tasks.py output (EXCLUDE.json)")
    ap.add_argument("--out", default=None, help="default: data/corpus/base (data/corpus/base-tiny with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a ~1.3 MB corpus: every k-th unit of each source, up to 320 KB each")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out_dir = args.out or os.path.join(REPO, "data/corpus/base-tiny" if args.tiny else "data/corpus/base")
    t0 = time.time()

    ex_path = os.path.join(args.tasks, "EXCLUDE.json")
    if not os.path.exists(ex_path):
        raise SystemExit(f"build_corpus: {ex_path} missing; run tools/make_tasks.py first")
    inputs = dict(format=FORMAT_VERSION, debs=mt.deb_versions(args.debs), exclude_sha256=mt.sha256_file(ex_path),
                  script=mt.sha256_file(os.path.abspath(__file__)), make_tasks=mt.sha256_file(mt.__file__),
                  apt_lists={os.path.basename(p): mt.sha256_file(p) for p in sum(mt.apt_list_files(args.apt_lists), [])},
                  tiny=args.tiny)
    mpath = os.path.join(out_dir, "MANIFEST.json")
    if not args.force and os.path.exists(mpath):
        try:
            m = json.load(open(mpath, encoding="utf-8"))
            if m.get("inputs") == inputs and all(
                    os.path.exists(os.path.join(out_dir, f)) and mt.sha256_file(os.path.join(out_dir, f)) == i["sha256"]
                    for f, i in m["files"].items()):
                print(f"build_corpus: {os.path.relpath(out_dir, REPO)} up to date ({m['total_bytes']} bytes)")
                return
        except (ValueError, KeyError):
            pass

    exclude = json.load(open(ex_path, encoding="utf-8"))["tasks"]
    texts = [t for v in exclude.values() for t in v["texts"]]
    ex = Excluder(texts)
    self_test(ex, sorted(texts))
    print(f"build_corpus: {ex.n} val/test texts to exclude; matcher self-test passed")

    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "*.txt")):
        os.remove(old)
    limit = TINY_BYTES_PER_SOURCE if args.tiny else None
    files, per_source = {}, {}
    for source in SOURCES:
        t1 = time.time()
        extra = {}
        if source == "debian":
            excl = set(exclude["debian_section"]["group_packages"])
            units, _ = debian_units(args.apt_lists, excl)
            extra["excluded_packages"] = len(excl)
        elif source == "python":
            units, removed = python_units(args.root, set(exclude["python_docs"]["refs"]))
            extra["excluded_api_entries"] = removed
        elif source == "perl":
            units = perl_units(args.root)
        elif source == "wordnet":
            units = wordnet_units(args.root, set(exclude["wordnet_lexname"]["refs"]))
            extra["excluded_synsets"] = len(exclude["wordnet_lexname"]["refs"])
        else:
            units = license_units(args.root)
        names, stats = write_source(out_dir, source, units, ex, SHARD_BYTES, limit,
                                    joiner="\n" if source == "wordnet" else "\n\n")
        size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in names)
        per_source[source] = dict(files=len(names), bytes=size, units=stats["units"],
                                  paragraphs_dropped_by_text_match=stats["paragraphs_dropped"], **extra)
        for f in names:
            files[f] = None
        print(f"build_corpus: {source}: {size / 1e6:.1f} MB in {len(names)} files, {stats['units']} units, "
              f"{stats['paragraphs_dropped']} paragraphs dropped by text match ({time.time() - t1:.1f}s)")
    names = sorted(files)
    t1 = time.time()
    verify(out_dir, names, ex)
    print(f"build_corpus: exclusion verified: none of {ex.n} val/test texts occurs in {len(names)} files "
          f"({time.time() - t1:.1f}s)")
    fi = {f: dict(sha256=mt.sha256_file(os.path.join(out_dir, f)), bytes=os.path.getsize(os.path.join(out_dir, f)))
          for f in names}
    total = sum(v["bytes"] for v in fi.values())
    manifest = dict(format=FORMAT_VERSION, generated_by="tools/build_corpus.py", inputs=inputs, total_bytes=total,
                    sources=per_source, files=fi,
                    exclusion=dict(texts=ex.n, rule="no val/test prompt text (as a lowercased \\w+ word sequence) "
                                                    "occurs in any file; verified after writing"),
                    note="each file is one training document; units inside a file are separated by blank lines")
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    print(f"build_corpus: wrote {total / 1e6:.1f} MB in {len(names)} files to {os.path.relpath(out_dir, REPO)} "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
