#!/usr/bin/python3
"""Few-shot classification tasks built from Debian packages (stdlib only; run with /usr/bin/python3).

Writes data/tasks/<task>/{train,val,test}.jsonl, data/tasks/MANIFEST.json and data/tasks/EXCLUDE.json
(the val/test texts and the source units they come from, which tools/build_corpus.py keeps out of the
pretraining corpus). Each JSONL line is one multiple-choice example:

  {"prompt": "Definition: a domestic animal ...\\nCategory:", "choices": [" animal", " plant", ...], "label": 0}

Tasks (docs/fewshot/TASKS.md describes them):
  debian_section   package synopsis + long description (apt lists)  -> archive section (12 classes)
  wordnet_lexname  WordNet noun gloss (wordnet-base)                 -> lexicographer file (12 classes)
  python_docs      Python stdlib API description (python3.X-doc)     -> library chapter (10 classes)

Inputs: the .deb files that tools/setup_study_data.sh downloads to data/debian/debs and extracts into
data/debian/root, and the private apt lists (with Translation-en) in data/debian/apt/lists. The output is
deterministic given those.

  /usr/bin/python3 tools/make_tasks.py            # full splits (skips when up to date)
  /usr/bin/python3 tools/make_tasks.py --tiny     # also data/tasks-tiny: subsets of the full splits
  /usr/bin/python3 tools/make_tasks.py --force    # rebuild even when up to date
"""
import argparse
import collections
import glob
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT_VERSION = 1
MAX_CHARS = 300  # cap on the text part of a prompt, cut at a word boundary
MIN_WORDS = 4  # shorter texts are dropped (build_corpus.py's exclusion index relies on this)
TEST_PER_CLASS = 50
VAL_PER_CLASS = 25
POOL_PER_CLASS = 400  # train pool: stratified, at most this many per class
TINY = dict(test=4, val=2, train=256)  # per class, per class, total (n = 16 and 64 draw different subsets)

# ---------------------------------------------------------------- text helpers (shared with build_corpus.py)
WORD_RE = re.compile(r"\w+")


def norm_words(text):
    """The normalized form used for dedupe and corpus exclusion: the lowercased \\w+ tokens."""
    return [w.lower() for w in WORD_RE.findall(text)]


def norm_key(text):
    return " ".join(norm_words(text))


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


def cap(text, n=MAX_CHARS):
    """Cut at a word boundary to at most n characters (plus '...' when cut)."""
    text = squash(text)
    if len(text) <= n:
        return text
    cut = text[: n + 1]
    sp = cut.rfind(" ")
    cut = cut[:sp] if sp > n // 2 else text[:n]
    return cut.rstrip(" ,;:-(") + " ..."


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def sha256_text(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def cat_file(path):
    """Decompress an apt list file (lz4/xz/gz/zst/plain) with apt's own helper."""
    helper = "/usr/lib/apt/apt-helper"
    if os.path.exists(helper):
        return subprocess.run([helper, "cat-file", path], check=True, stdout=subprocess.PIPE).stdout.decode("utf-8", "replace")
    import gzip, lzma  # fallback for machines without apt-helper

    opener = {".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def deb_versions(debs_dir):
    """{package: version} of the .deb files in data/debian/debs (their control fields, via dpkg-deb)."""
    out = {}
    for deb in sorted(glob.glob(os.path.join(debs_dir, "*.deb"))):
        r = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version"], check=True, stdout=subprocess.PIPE, text=True)
        f = dict(l.split(": ", 1) for l in r.stdout.strip().splitlines())
        out[f["Package"]] = f["Version"]
    return out


# ---------------------------------------------------------------- optional GPT-2 BPE (for statistics only)
class GPT2BPE:
    """GPT-2 byte-level BPE; the pre-tokenizer approximates \\p{L}/\\p{N} with stdlib classes."""

    PAT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_dir):
        with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as f:
            self.enc = json.load(f)
        with open(os.path.join(vocab_dir, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(l.split()) for l in f.read().splitlines()[1:] if l.strip()]
        self.ranks = {m: i for i, m in enumerate(merges)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.b2u = {b: chr(c) for b, c in zip(bs, cs)}
        self.cache = {}

    def _bpe(self, tok):
        if tok in self.cache:
            return self.cache[tok]
        word = list(tok)
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            a, b = word[i], word[i + 1]
            new, j = [], 0
            while j < len(word):
                if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            word = new
        self.cache[tok] = word
        return word

    def encode(self, text):
        ids = []
        for piece in self.PAT.findall(text):
            u = "".join(self.b2u[b] for b in piece.encode("utf-8"))
            ids.extend(self.enc[t] for t in self._bpe(u))
        return ids


# ---------------------------------------------------------------- task 1: debian_section
# section -> choice word. Sections chosen: well populated, topical (not "libs"/"python"/... which the
# description's boilerplate gives away, nor catch-alls such as "utils", "misc", "x11").
DEBIAN_CLASSES = [
    ("admin", " administration"),
    ("devel", " development"),
    ("doc", " documentation"),
    ("games", " games"),
    ("graphics", " graphics"),
    ("mail", " email"),
    ("math", " mathematics"),
    ("net", " networking"),
    ("science", " science"),
    ("sound", " audio"),
    ("text", " text"),
    ("web", " web"),
]
DEBIAN_DROP = re.compile(r"transitional|dummy package|debug(ging)? symbols|metapackage|meta-package|"
                         r"empty package|this package is obsolete", re.I)
DEBIAN_DROP_NAME = re.compile(r"-(dbg|dbgsym)$")


OFFICIAL_ORIGINS = ("Debian", "Ubuntu")


def apt_list_files(lists_dir):
    """(Packages files, Translation-en files) of the distribution's own base suites: Origin Debian or Ubuntu
    in the suite's (In)Release file (third-party repositories left out), and not -updates/-security/..."""
    def official_base_suite(p):
        name = os.path.basename(p)
        m = re.search(r"^(.*_dists_([^_]+))_", name)
        if m is None or "-" in m.group(2):
            return False
        for rel in ("InRelease", "Release"):
            rp = os.path.join(lists_dir, m.group(1) + "_" + rel)
            if os.path.exists(rp):
                with open(rp, encoding="utf-8", errors="replace") as f:
                    head = f.read(4096)
                o = re.search(r"^Origin:\s*(.+)$", head, re.M)
                return o is not None and o.group(1).strip() in OFFICIAL_ORIGINS
        return False

    pk = sorted(p for p in glob.glob(os.path.join(lists_dir, "*_Packages*")) if official_base_suite(p))
    tr = sorted(p for p in glob.glob(os.path.join(lists_dir, "*_i18n_Translation-en*")) if official_base_suite(p))
    return pk, tr


def parse_deb822(text):
    for block in text.split("\n\n"):
        rec, key = {}, None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key:
                rec[key] += "\n" + line
            else:
                key, _, val = line.partition(":")
                rec[key] = val.strip()
        if rec:
            yield rec


def long_description_paragraphs(desc):
    """Description field (first line = synopsis) -> (synopsis, [paragraph, ...]) per Debian policy 5.6.13."""
    lines = desc.split("\n")
    synopsis = lines[0].strip()
    paras, cur = [], []
    for l in lines[1:]:
        s = l[1:] if l.startswith(" ") else l
        if s.strip() == ".":
            if cur:
                paras.append("\n".join(cur))
            cur = []
        else:
            cur.append(s.rstrip())
    if cur:
        paras.append("\n".join(cur))
    return synopsis, paras


def load_debian_descriptions(lists_dir):
    """{package: dict(section, source, synopsis, paras, md5)} from the base-suite apt lists."""
    pk_files, tr_files = apt_list_files(lists_dir)
    if not pk_files:
        raise SystemExit(f"make_tasks: no Packages files under {lists_dir} (run tools/setup_study_data.sh)")
    if not tr_files:
        raise SystemExit(f"make_tasks: no Translation-en files under {lists_dir}; apt-get update needs "
                         "-o Acquire::Languages=en (tools/setup_study_data.sh does that)")
    trans = {}
    for p in tr_files:
        for r in parse_deb822(cat_file(p)):
            if "Description-md5" in r and "Description-en" in r:
                trans.setdefault(r["Description-md5"], r["Description-en"])
    pkgs = {}
    for p in pk_files:
        for r in parse_deb822(cat_file(p)):
            name = r.get("Package")
            if not name or name in pkgs:
                continue
            desc = r.get("Description", "")
            md5 = r.get("Description-md5")
            if "\n" not in desc and md5 in trans:
                desc = trans[md5]
            if "\n" not in desc:
                continue  # no long description available
            syn, paras = long_description_paragraphs(desc)
            src = r.get("Source", name).split()[0]
            sec = r.get("Section", "").split("/")[-1]
            pkgs[name] = dict(section=sec, source=src, synopsis=syn, paras=paras, md5=md5 or sha256_text(desc))
    inputs = {os.path.basename(p): sha256_file(p) for p in pk_files + tr_files}
    for p in sorted(glob.glob(os.path.join(lists_dir, "*_InRelease"))):
        if any(os.path.basename(q).startswith(os.path.basename(p)[: -len("InRelease")]) for q in pk_files):
            with open(p, encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
            inputs[os.path.basename(p)] = {k: v.strip() for k, v in re.findall(r"^(Origin|Codename|Version|Date):(.*)$", head, re.M)}
    return pkgs, inputs


def debian_text(d):
    syn = d["synopsis"]
    if syn and syn[-1] not in ".!?":
        syn += "."
    return squash(syn + " " + " ".join(d["paras"]))


CLUSTER_MIN_WORDS = 10  # description paragraphs this long link packages into one group ...
CLUSTER_MAX_SOURCES = 10  # ... unless more source packages than this share them (boilerplate)


def debian_clusters(pkgs):
    """{package: group}: packages of one source package, and packages whose long descriptions share a
    paragraph (e.g. 0ad and 0ad-data, of different source packages), form one group; the group is named
    by its alphabetically first package."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_para = collections.defaultdict(set)
    for name in sorted(pkgs):
        d = pkgs[name]
        union(name, "\x00src:" + d["source"])
        for p in d["paras"]:
            k = norm_key(p)
            if len(k.split()) >= CLUSTER_MIN_WORDS:
                by_para[k].add(name)
    for k in sorted(by_para):
        names = sorted(by_para[k])
        if len({pkgs[n]["source"] for n in names}) <= CLUSTER_MAX_SOURCES:
            for n in names[1:]:
                union(names[0], n)
    members = collections.defaultdict(list)
    for name in sorted(pkgs):
        members[find(name)].append(name)
    return {n: ms[0] for ms in members.values() for n in ms}, {ms[0]: ms for ms in members.values()}


def debian_candidates(pkgs, clusters):
    cls = {s: i for i, (s, _) in enumerate(DEBIAN_CLASSES)}
    out = []
    for name in sorted(pkgs):
        d = pkgs[name]
        if d["section"] not in cls or DEBIAN_DROP_NAME.search(name):
            continue
        full = debian_text(d)
        if DEBIAN_DROP.search(full):
            continue
        out.append(dict(group=clusters[name], cls=cls[d["section"]], text=full, ref=name))
    return out


# ---------------------------------------------------------------- task 2: wordnet_lexname
WN_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
               "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
               "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
               "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
               "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
               "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
               "adj.ppl").split()
WORDNET_CLASSES = [
    ("noun.act", " action"),
    ("noun.animal", " animal"),
    ("noun.artifact", " artifact"),
    ("noun.body", " body"),
    ("noun.communication", " communication"),
    ("noun.feeling", " feeling"),
    ("noun.food", " food"),
    ("noun.location", " place"),
    ("noun.person", " person"),
    ("noun.plant", " plant"),
    ("noun.substance", " substance"),
    ("noun.time", " time"),
]


def wordnet_dir(root):
    d = os.path.join(root, "usr/share/wordnet")
    if not os.path.exists(os.path.join(d, "data.noun")):
        raise SystemExit(f"make_tasks: {d}/data.noun missing (wordnet-base not extracted; run tools/setup_study_data.sh)")
    return d


def split_gloss(gloss):
    """WordNet gloss -> (definition, [example, ...]); examples are the double-quoted parts."""
    parts = [p.strip() for p in gloss.split(";")]
    defs, exs = [], []
    for p in parts:
        if p.startswith('"'):
            exs.append(p.strip('"').strip())
        elif p and not exs:
            defs.append(p)
        elif p:
            exs.append(p)  # unquoted tail after an example (rare): not part of the definition
    return "; ".join(defs).strip(), exs


def wordnet_synsets(root, pos_list=("noun", "verb", "adj", "adv")):
    """Yields dict(pos, offset, lexname, words, definition, examples) in file order."""
    d = wordnet_dir(root)
    for pos in pos_list:
        with open(os.path.join(d, "data." + pos), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.rstrip("\n").split(" | ", 1)
                fld = head.split()
                n = int(fld[3], 16)
                words = [fld[4 + 2 * i].replace("_", " ") for i in range(n)]
                words = [re.sub(r"\((a|p|ip)\)$", "", w) for w in words]
                definition, exs = split_gloss(gloss.strip())
                yield dict(pos=pos, offset=fld[0], lexname=WN_LEXNAMES[int(fld[1])], words=words,
                           definition=definition, examples=exs)


def wordnet_candidates(root):
    cls = {s: i for i, (s, _) in enumerate(WORDNET_CLASSES)}
    out = []
    for s in wordnet_synsets(root, ("noun",)):
        if s["lexname"] in cls:
            out.append(dict(group="n" + s["offset"], cls=cls[s["lexname"]], text=s["definition"], ref="n" + s["offset"]))
    return out


# ---------------------------------------------------------------- task 3: python_docs
# library chapter (library/index.rst toctree entry) -> choice word
PYTHON_CLASSES = [
    ("text.rst", " text"),             # Text Processing Services
    ("numeric.rst", " math"),          # Numeric and Mathematical Modules
    ("filesys.rst", " files"),         # File and Directory Access
    ("archiving.rst", " compression"), # Data Compression and Archiving
    ("concurrency.rst", " concurrency"),  # Concurrent Execution
    ("ipc.rst", " networking"),        # Networking and Interprocess Communication
    ("internet.rst", " internet"),     # Internet Protocols and Support
    ("markup.rst", " markup"),         # Structured Markup Processing Tools
    ("tk.rst", " GUI"),                # Graphical User Interfaces with Tk
    ("debug.rst", " debugging"),       # Debugging and Profiling
]
PY_DIRECTIVE = re.compile(r"^(\s*)\.\. (function|method|class|attribute|data|exception|decorator|decoratormethod|"
                          r"classmethod|staticmethod|coroutinemethod|coroutinefunction|abstractmethod|opcode)::\s*(.*)$")


RST_FIELD = re.compile(r"^:[^`:]+:(\s|$)")  # field list / directive option, e.g. ":noindex:" (not a :role:`x`)
RST_TABLE = re.compile(r"^(\||[+=-]{3,})")  # line blocks and table rows


def python_sources(root):
    cands = sorted(glob.glob(os.path.join(root, "usr/share/doc/python3*/html/_sources")))
    if not cands:
        raise SystemExit(f"make_tasks: no usr/share/doc/python3*/html/_sources under {root} "
                         "(python3.X-doc not extracted; run tools/setup_study_data.sh)")
    return cands[-1]


def _role(m):
    name, body = m.group(1), m.group(2)
    lm = re.match(r"^(.*?)\s*<[^<>]+>$", body, re.S)
    if lm and lm.group(1):
        return lm.group(1)
    body = body.lstrip("!")
    if body.startswith("~"):
        body = body[1:].split(".")[-1]
    if name in ("rfc", "pep"):
        body = name.upper() + " " + body
    return body


def rst_inline(text):
    """Light reST inline cleanup: roles, literals, emphasis, links, substitutions, escapes."""
    text = text.replace("\\ ", "")
    text = re.sub(r":([\w:.+-]+):`([^`]*?)`", _role, text)
    literals = []

    def keep(m):
        literals.append(m.group(1))
        return f"\x00{len(literals) - 1}\x00"

    text = re.sub(r"``(.+?)``", keep, text, flags=re.S)
    text = re.sub(r"\\(.)", keep, text)
    text = re.sub(r"`([^`<]+?)\s*<[^>`]+>`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"\1", text, flags=re.S)
    text = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text, flags=re.S)
    text = re.sub(r"\|nbsp\|", " ", text)
    text = re.sub(r"\|(\w[\w -]*)\|_?", r"\1", text)
    return re.sub("\x00(\\d+)\x00", lambda m: literals[int(m.group(1))], text)


def python_chapters(src):
    """{rst path relative to library/: chapter file} by walking library/index.rst's toctrees."""
    lib = os.path.join(src, "library")

    def toc(f):
        out, lines, i = [], open(os.path.join(lib, f + ".txt"), encoding="utf-8").read().splitlines(), 0
        while i < len(lines):
            if lines[i].startswith(".. toctree::"):
                i += 1
                while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
                    s = lines[i].strip()
                    if s and not s.startswith(":"):
                        out.append(s if s.endswith(".rst") else s + ".rst")
                    i += 1
            else:
                i += 1
        return out

    chap = {}
    for c in toc("index.rst"):
        stack = [c]
        while stack:
            f = stack.pop()
            if f in chap or not os.path.exists(os.path.join(lib, f + ".txt")):
                continue
            chap[f] = c
            stack.extend(reversed(toc(f)))
    return chap


def python_entries(path):
    """API entries of one rst file: dict(start, stop, text). Lines [start, stop) are the directive and its
    own description (up to the first nested API entry, e.g. a class's methods); text is its cleaned prose
    (paragraphs at the body's indentation; literal blocks, nested directives and doctests left out)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = PY_DIRECTIVE.match(line)
        if not m:
            continue
        ind = len(m.group(1))
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > ind):
            j += 1
        k = i + 1
        while k < j and lines[k].strip():  # signature continuation and option lines
            k += 1
        paras, cur, body_ind, stop = [], [], None, j
        for n in range(k, j + 1):
            l = lines[n] if n < j else ""
            if n < j and PY_DIRECTIVE.match(l):
                stop = n
                l = ""
            if not l.strip():
                if cur:
                    paras.append(" ".join(cur))
                    cur = []
                if stop != j:
                    break
                continue
            li = len(l) - len(l.lstrip())
            if body_ind is None:
                body_ind = li
            s = l.strip()
            if (li != body_ind or s.startswith(".. ") or s.startswith(">>>") or RST_FIELD.match(s)
                    or RST_TABLE.match(s)):
                if cur:
                    paras.append(" ".join(cur))
                    cur = []
                continue
            cur.append(s)
        while stop > i + 1 and not lines[stop - 1].strip():
            stop -= 1
        text = ""
        for p in paras:
            p = squash(rst_inline(p))
            if p.endswith(" ::") or p == "::":  # reST: "text ::" -> "text", "text::" -> "text:"
                p = p[:-3].rstrip()
            elif p.endswith("::"):
                p = p[:-1]
            if not p:
                continue
            text = (text + " " + p).strip()
            if len(text) >= MAX_CHARS:
                break
        out.append(dict(start=i, stop=stop, text=text))
    return out


def python_candidates(root):
    src = python_sources(root)
    chap = python_chapters(src)
    cls = {c: i for i, (c, _) in enumerate(PYTHON_CLASSES)}
    out = []
    for f in sorted(chap):
        if chap[f] not in cls:
            continue
        for e in python_entries(os.path.join(src, "library", f + ".txt")):
            out.append(dict(group=f"{f}:{e['start']}", cls=cls[chap[f]], text=e["text"], ref=f"library/{f}:{e['start'] + 1}"))
    return out


# ---------------------------------------------------------------- splitting
def dedupe(cands):
    """Drops texts that are too short, and normalized texts seen with two classes; keeps one per text."""
    by_key = collections.defaultdict(list)
    for c in cands:
        c["prompt_text"] = cap(c["text"])
        c["key"] = norm_key(c["prompt_text"])
        if len(c["key"].split()) >= MIN_WORDS:
            by_key[c["key"]].append(c)
    out, ambiguous = [], 0
    for key in sorted(by_key):
        cs = by_key[key]
        if len({c["cls"] for c in cs}) > 1:
            ambiguous += 1
            continue
        out.append(min(cs, key=lambda c: (c["group"], c["ref"])))
    return out, ambiguous


def make_splits(cands, n_classes, seed):
    """Group-aware split: a group (e.g. a Debian source package) lands in one split only, and gives at most
    one example per class. Test and val are exactly balanced; the train pool is stratified with a cap and
    holds no text that contains a val/test text or is contained in one (as word sequences)."""
    rng = random.Random(seed)
    groups = collections.defaultdict(list)
    for c in cands:
        groups[c["group"]].append(c)
    order = sorted(groups)
    rng.shuffle(order)
    for g in order:
        groups[g].sort(key=lambda c: c["key"])
        rng.shuffle(groups[g])
    splits = {"test": [], "val": [], "train": []}
    quota = {"test": TEST_PER_CLASS, "val": VAL_PER_CLASS, "train": POOL_PER_CLASS}
    free = list(order)
    held_out, blob = [], ""

    def overlaps(c):  # train only: a val/test text inside this text, or this text inside a val/test text
        k = " " + c["key"] + " "
        return k in blob or any(h in k for h in held_out)

    for split in ("test", "val", "train"):
        have = collections.Counter()
        rest = []
        if split == "train":
            held_out = [" " + c["key"] + " " for s in ("test", "val") for c in splits[s]]
            blob = "|".join(held_out)
        for g in free:
            picked = {}
            for c in groups[g]:
                if c["cls"] not in picked and have[c["cls"]] + 1 <= quota[split] and not (split == "train" and overlaps(c)):
                    picked[c["cls"]] = c
            if picked:
                for k, c in picked.items():
                    have[k] += 1
                    splits[split].append(c)
            else:
                rest.append(g)
        if split != "train":
            short = [k for k in range(n_classes) if have[k] < quota[split]]
            if short:
                raise SystemExit(f"make_tasks: not enough data for {split}: classes {short} have {[have[k] for k in short]}")
        free = rest
    for split in splits:
        rng.shuffle(splits[split])
    return splits


# ---------------------------------------------------------------- main
TASKS = {
    "debian_section": dict(classes=DEBIAN_CLASSES, prefix="Package description: ", suffix="\nCategory:", seed=1001,
                           source="apt lists (Packages + Translation-en), base suite"),
    "wordnet_lexname": dict(classes=WORDNET_CLASSES, prefix="Definition: ", suffix="\nCategory:", seed=1002,
                            source="wordnet-base: data.noun"),
    "python_docs": dict(classes=PYTHON_CLASSES, prefix="Python documentation: ", suffix="\nTopic:", seed=1003,
                        source="python3.X-doc: html/_sources/library/*.rst.txt"),
}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def example_row(c, spec):
    return {"prompt": spec["prefix"] + c["prompt_text"] + spec["suffix"], "choices": [w for _, w in spec["classes"]],
            "label": c["cls"]}


def write_task_dir(out_dir, name, spec, splits, meta):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    files, counts, per_class = {}, {}, {}
    names = [s for s, _ in spec["classes"]]
    for split in ("train", "val", "test"):
        p = os.path.join(d, split + ".jsonl")
        write_jsonl(p, [example_row(c, spec) for c in splits[split]])
        files[split + ".jsonl"] = dict(sha256=sha256_file(p), bytes=os.path.getsize(p))
        counts[split] = len(splits[split])
        cc = collections.Counter(c["cls"] for c in splits[split])
        per_class[split] = {names[k]: cc[k] for k in range(len(names))}
    return dict(meta, classes=names, choices=[w for _, w in spec["classes"]], prompt_prefix=spec["prefix"],
                prompt_suffix=spec["suffix"], seed=spec["seed"], counts=counts, per_class=per_class, files=files)


def inputs_fingerprint(args):
    debs = deb_versions(args.debs)
    pk, tr = apt_list_files(args.apt_lists)
    lists = {os.path.basename(p): sha256_file(p) for p in pk + tr}
    return dict(format=FORMAT_VERSION, debs=debs, apt_lists=lists,
                script=sha256_file(os.path.abspath(__file__)))


def up_to_date(out_dir, fp):
    mpath = os.path.join(out_dir, "MANIFEST.json")
    try:
        m = json.load(open(mpath, encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if m.get("inputs") != fp:
        return False
    for name, t in m.get("tasks", {}).items():
        for fn, info in t["files"].items():
            p = os.path.join(out_dir, name, fn)
            if not os.path.exists(p) or os.path.getsize(p) != info["bytes"] or sha256_file(p) != info["sha256"]:
                return False
    ex = os.path.join(out_dir, "EXCLUDE.json")
    return os.path.exists(ex) and sha256_file(ex) == m.get("exclude_sha256")


def naive_bayes_acc(train, test, n_classes):
    """Multinomial naive Bayes on lowercased word counts (add-1 smoothing, uniform prior: test is balanced)."""
    wc = [collections.Counter() for _ in range(n_classes)]
    for c in train:
        wc[c["cls"]].update(norm_words(c["prompt_text"]))
    vocab = set().union(*wc)
    logp = [{w: math.log((n + 1) / (sum(w_.values()) + len(vocab))) for w, n in w_.items()} for w_ in wc]
    unk = [math.log(1 / (sum(w_.values()) + len(vocab))) for w_ in wc]
    ok = 0
    for c in test:
        words = [w for w in norm_words(c["prompt_text"]) if w in vocab]
        scores = [sum(logp[k].get(w, unk[k]) for w in words) for k in range(n_classes)]
        ok += max(range(n_classes), key=lambda k: (scores[k], -k)) == c["cls"]
    return round(ok / len(test), 4)


def baselines(splits, n_classes):
    """Chance, majority class of the pool, and naive Bayes trained on the first n pool examples, on test."""
    train, test = splits["train"], splits["test"]
    maj = collections.Counter(c["cls"] for c in train).most_common(1)[0][0]
    out = dict(chance=round(1 / n_classes, 4), majority=round(sum(c["cls"] == maj for c in test) / len(test), 4))
    for n in (64, 256, 1024):
        if n < len(train):
            out[f"naive_bayes_{n}"] = naive_bayes_acc(train[:n], test, n_classes)
    out["naive_bayes_pool"] = naive_bayes_acc(train, test, n_classes)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(REPO, "data/debian/root"), help="extracted .deb files")
    ap.add_argument("--debs", default=os.path.join(REPO, "data/debian/debs"), help="the .deb files (for their versions)")
    ap.add_argument("--apt-lists", default=os.path.join(REPO, "data/debian/apt/lists"), help="apt lists with Translation-en")
    ap.add_argument("--out", default=os.path.join(REPO, "data/tasks"))
    ap.add_argument("--tiny-out", default=os.path.join(REPO, "data/tasks-tiny"))
    ap.add_argument("--tiny", action="store_true", help="also write the tiny CI splits (subsets of the full ones)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the manifest says up to date")
    ap.add_argument("--vocab-dir", default=os.path.join(REPO, "data/gpt2"), help="GPT-2 vocab for token statistics")
    args = ap.parse_args()
    t0 = time.time()

    fp = inputs_fingerprint(args)
    tiny_ok = not args.tiny or up_to_date(args.tiny_out, fp)
    if not args.force and up_to_date(args.out, fp) and tiny_ok:
        print(f"make_tasks: {os.path.relpath(args.out, REPO)} up to date")
        return
    pkgs, list_inputs = load_debian_descriptions(args.apt_lists)
    clusters, cluster_members = debian_clusters(pkgs)
    debs = fp["debs"]
    pydoc_pkg = next((p for p in sorted(debs) if re.fullmatch(r"python3\.\d+-doc", p)), None)
    bpe = GPT2BPE(args.vocab_dir) if os.path.exists(os.path.join(args.vocab_dir, "merges.txt")) else None

    cand_fns = {
        "debian_section": (lambda: debian_candidates(pkgs, clusters), dict(source_packages={"apt-lists": list_inputs})),
        "wordnet_lexname": (lambda: wordnet_candidates(args.root),
                            dict(source_packages={"wordnet-base": debs.get("wordnet-base")})),
        "python_docs": (lambda: python_candidates(args.root), dict(source_packages={pydoc_pkg: debs.get(pydoc_pkg)})),
    }
    manifest = dict(format=FORMAT_VERSION, generated_by="tools/make_tasks.py", inputs=fp, tasks={})
    tiny_manifest = dict(manifest, tasks={}, tiny=dict(TINY, note="subsets of the full splits (first k per class)"))
    exclude = {}
    for name, spec in TASKS.items():
        fn, meta = cand_fns[name]
        cands = fn()
        n_raw = len(cands)
        cands, ambiguous = dedupe(cands)
        splits = make_splits(cands, len(spec["classes"]), spec["seed"])
        # sanity: no normalized text in two splits, balance
        keys = {s: {c["key"] for c in splits[s]} for s in splits}
        assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
        groups = {s: {c["group"] for c in splits[s]} for s in splits}
        assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"]) and not (groups["val"] & groups["test"])
        meta = dict(meta, source=spec["source"], candidates=n_raw, after_dedupe=len(cands),
                    dropped_ambiguous_texts=ambiguous, baselines=baselines(splits, len(spec["classes"])))
        if bpe:
            lens = [len(bpe.encode(example_row(c, spec)["prompt"])) for s in splits.values() for c in s]
            first = [bpe.encode(w)[0] for _, w in spec["classes"]]
            meta["gpt2_tokens"] = dict(prompt_max=max(lens), prompt_mean=round(sum(lens) / len(lens), 1),
                                       choice_tokens={w: len(bpe.encode(w)) for _, w in spec["classes"]},
                                       choices_distinct_first_token=len(set(first)) == len(first))
        manifest["tasks"][name] = write_task_dir(args.out, name, spec, splits, meta)
        exclude[name] = dict(
            prompt_prefix=spec["prefix"], prompt_suffix=spec["suffix"],
            texts=sorted({c["prompt_text"] for s in ("val", "test") for c in splits[s]}),
            groups=sorted({c["group"] for s in ("val", "test") for c in splits[s]}),
            refs=sorted({c["ref"] for s in ("val", "test") for c in splits[s]}))
        if name == "debian_section":  # the corpus leaves out every package of a val/test group
            exclude[name]["group_packages"] = sorted({p for g in exclude[name]["groups"] for p in cluster_members[g]})
        if args.tiny:
            tiny = {}
            for s, k in (("test", TINY["test"]), ("val", TINY["val"])):
                have, rows = collections.Counter(), []
                for c in splits[s]:
                    if have[c["cls"]] < k:
                        have[c["cls"]] += 1
                        rows.append(c)
                tiny[s] = rows
            tiny["train"] = splits["train"][: TINY["train"]]
            tiny_manifest["tasks"][name] = write_task_dir(args.tiny_out, name, spec, tiny, dict(meta, baselines=None))
        t = manifest["tasks"][name]
        print(f"make_tasks: {name}: {n_raw} candidates, {len(cands)} after dedupe; "
              f"train {t['counts']['train']} val {t['counts']['val']} test {t['counts']['test']}; "
              f"baselines {meta['baselines']}" + (f"; tokens {meta['gpt2_tokens']}" if bpe else ""))
    os.makedirs(args.out, exist_ok=True)
    ex_path = os.path.join(args.out, "EXCLUDE.json")
    with open(ex_path, "w", encoding="utf-8") as f:
        json.dump(dict(note="val+test texts of every task; build_corpus.py keeps them (and their source units) "
                            "out of the corpus", tasks=exclude), f, ensure_ascii=False, indent=1)
    manifest["exclude_sha256"] = sha256_file(ex_path)
    with open(os.path.join(args.out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    if args.tiny:
        import shutil

        shutil.copyfile(ex_path, os.path.join(args.tiny_out, "EXCLUDE.json"))
        tiny_manifest["exclude_sha256"] = manifest["exclude_sha256"]
        with open(os.path.join(args.tiny_out, "MANIFEST.json"), "w", encoding="utf-8") as f:
            json.dump(tiny_manifest, f, ensure_ascii=False, indent=1)
    print(f"make_tasks: wrote {os.path.relpath(args.out, REPO)}" + (f" and {os.path.relpath(args.tiny_out, REPO)}" if args.tiny else "")
          + f" in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
