#!/usr/bin/env bash
# Data for the few-shot classification study, from Debian packages. Idempotent; a rerun with nothing to do takes a few seconds.
#   bash tools/setup_study_data.sh                       # tasks (+ tiny) and corpora (base + base-tiny)
#   STUDY_DATA_TINY=1 bash tools/setup_study_data.sh     # CI: tasks (+ tiny) and only data/corpus/base-tiny
#   STUDY_DATA_REFRESH=1 bash tools/setup_study_data.sh  # re-read the archive: newer lists/.debs -> new data
#
# Nothing is installed system-wide: the .debs (wordnet-base, python3.X-doc, perl-doc, base-files) are
# downloaded with `apt-get download` into data/debian/debs and unpacked with `dpkg-deb -x` into
# data/debian/root, and apt's lists -- with the long package descriptions (Translation-en), which Debian
# images often leave out -- are fetched into a private directory, data/debian/apt, so the system's apt
# state is untouched and no root is needed (sudo only installs python3 where /usr/bin/python3 is missing).
# About 16 MB of lists and 27 MB of .debs are downloaded once; later runs reuse them, so the data stay
# the same until STUDY_DATA_REFRESH=1. tools/make_tasks.py and tools/build_corpus.py then skip their
# work when their manifests say the inputs (package versions, list hashes, scripts) are unchanged.
#
# Outputs: data/tasks/<task>/{train,val,test}.jsonl + MANIFEST.json + EXCLUDE.json, data/tasks-tiny/...,
# data/corpus/base/*.txt + MANIFEST.json, data/corpus/base-tiny/... (docs/fewshot/TASKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=/usr/bin/python3  # Debian's python3, stdlib only (not a pyenv/conda python on PATH)
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
if [[ ! -x $PY ]]; then
  echo "setup_study_data: installing python3"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 >/dev/null
fi

top=data/debian
lists=$top/apt/lists cache=$top/apt/cache debs=$top/debs root=$top/root
mkdir -p "$lists/partial" "$cache/archives/partial" "$debs" "$root"
APT=(-o "Dir::State::Lists=$PWD/$lists" -o "Dir::Cache=$PWD/$cache" -o Debug::NoLocking=1
     -o Acquire::Languages=en
     -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false
     -o Acquire::IndexTargets::deb::CNF::DefaultEnabled=false)
for t in DEP-11 DEP-11-icons DEP-11-icons-small DEP-11-icons-large DEP-11-icons-hidpi DEP-11-icons-large-hidpi; do
  APT+=(-o "Acquire::IndexTargets::deb::$t::DefaultEnabled=false")
done
# as root, apt's _apt sandbox user may not be able to write into the checkout
[[ $(id -u) -eq 0 ]] && APT+=(-o APT::Sandbox::User=root)

t0=$SECONDS
if [[ -n "${STUDY_DATA_REFRESH:-}" ]] || ! compgen -G "$lists/*_i18n_Translation-en*" >/dev/null; then
  echo "setup_study_data: apt-get update into $lists (with Translation-en)"
  apt-get "${APT[@]}" update -qq
  if ! compgen -G "$lists/*_i18n_Translation-en*" >/dev/null; then
    echo "setup_study_data: the archive gave no Translation-en files; debian_section needs them" >&2
    exit 1
  fi
  if [[ -n "${STUDY_DATA_REFRESH:-}" ]]; then
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
  fi
fi

pydoc=$(apt-cache "${APT[@]}" depends python3-doc 2>/dev/null | sed -n 's/^ *Depends: \(python3\.[0-9]*-doc\)$/\1/p' | head -n1)
pkgs=(wordnet-base perl-doc base-files "${pydoc:-python3.11-doc}")
missing=()
for p in "${pkgs[@]}"; do
  compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup_study_data: downloading ${missing[*]}"
  (cd "$debs" && apt-get "${APT[@]}" download -qq "${missing[@]}")
fi

# unpack each .deb once (a stamp per .deb file); drop what the builders do not read
mkdir -p "$root/.stamps"
for deb in "$debs"/*.deb; do
  stamp="$root/.stamps/$(basename "$deb")"
  [[ -e $stamp ]] && continue
  pkg=$(dpkg-deb -f "$deb" Package)
  dpkg-deb -x "$deb" "$root"
  case $pkg in
    python3.*-doc)
      d="$root/usr/share/doc/${pkg%-doc}/html"
      find "$d" -mindepth 1 -maxdepth 1 ! -name _sources -exec rm -rf {} +
      rm -rf "$root/usr/share/info" ;;
    perl-doc) rm -rf "$root/usr/share/man" ;;
  esac
  touch "$stamp"
done
echo "setup_study_data: packages ready in $root ($((SECONDS - t0))s)"

$PY tools/make_tasks.py --tiny
$PY tools/build_corpus.py --tiny
if [[ -z "${STUDY_DATA_TINY:-}" ]]; then
  $PY tools/build_corpus.py
fi
echo "setup_study_data: done in $((SECONDS - t0))s"
