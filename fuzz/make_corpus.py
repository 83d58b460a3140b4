#!/usr/bin/env python3
"""Writes the committed seed corpus of the libFuzzer targets: fuzz/corpus/<target>/<name>, a few
small valid inputs per target (and a couple of near-valid ones), so that each run starts from the
formats' interesting paths instead of from nothing. Deterministic: running it again gives the same
files. The hand-written seed_* files next to them are kept (this script only writes its own names).   python3 fuzz/make_corpus.py
"""
import json
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
CORPUS = os.path.join(ROOT, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- config.json (GptConfig::from_json_file) -------------------------------------------------------
def config():
    t = "fuzz_config"
    with open(os.path.join(REPO, "tests/data/hf_tiny/config.json"), "rb") as f:
        put(t, "hf_tiny.json", f.read())
    put(t, "minimal.json", json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 300}))
    put(t, "gpt2.json", json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12,
                                    "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024,
                                    "n_ctx": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                                    "tie_word_embeddings": True}, indent=1))
    put(t, "untied.json", json.dumps({"n_layer": 1, "n_head": 1, "n_embd": 4, "vocab_size": 260, "n_positions": 16,
                                      "tie_word_embeddings": False, "layer_norm_epsilon": 0.001}))
    put(t, "bad_type.json", '{"n_layer": "2", "n_head": 2, "n_embd": 8, "vocab_size": 300}')


# ---- safetensors (load_safetensors) -----------------------------------------------------------------
def safetensors(tensors, metadata=None, pad_header=True):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, off, blob = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blob += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad_header:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def st():
    t = "fuzz_safetensors"
    f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
    put(t, "f32.safetensors", safetensors([("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6)), ("b", "F32", [3], f32(0.5, -1, 2))],
                                          {"format": "pt"}))
    put(t, "mixed.safetensors", safetensors([
        ("bf", "BF16", [4], struct.pack("<4H", 0x3F80, 0xBF80, 0x7F80, 0x0001)),
        ("h", "F16", [2, 2], struct.pack("<4H", 0x3C00, 0xC000, 0x7C00, 0x0400)),
        ("d", "F64", [2], struct.pack("<2d", 1.5, -2.25)),
        ("i", "I32", [3], struct.pack("<3i", 7, -1, 50256)),
    ]))
    put(t, "scalar_empty.safetensors", safetensors([("s", "F32", [], f32(3.0)), ("e", "F32", [0, 4], b"")]))
    put(t, "unpadded.safetensors", safetensors([("x", "F32", [1], f32(1.0))], pad_header=False))
    put(t, "empty.safetensors", safetensors([], {}))
    # A real (small) model: its header and first tensors, with the data offsets kept consistent.
    with open(os.path.join(REPO, "tests/data/hf_tiny/model.safetensors"), "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    keep = [k for k in hdr if k != "__metadata__" and hdr[k]["shape"] and len(hdr[k]["shape"]) == 1][:4]
    tens = []
    for k in keep:
        a, e = hdr[k]["data_offsets"]
        tens.append((k, hdr[k]["dtype"], hdr[k]["shape"], b[8 + n + a:8 + n + e]))
    put(t, "hf_tiny_part.safetensors", safetensors(tens, hdr.get("__metadata__")))


# ---- llm.c token shards (read_token_shard*) ----------------------------------------------------------
def shard(tokens, magic=20240520, version=1, count=None):
    h = [0] * 256
    h[0], h[1], h[2] = magic, version, len(tokens) if count is None else count
    return struct.pack("<256i", *h) + struct.pack(f"<{len(tokens)}H", *tokens)


def shards():
    t = "fuzz_token_shard"
    put(t, "empty.bin", shard([]))
    put(t, "five.bin", shard([50256, 15496, 11, 995, 0]))
    put(t, "hundred.bin", shard([(i * 7919) % 65536 for i in range(100)]))
    put(t, "short.bin", shard([1, 2, 3], count=4))


# ---- vocab.json + "\n#merges\n" + merges.txt (Tokenizer) ----------------------------------------------
def byte_tokens():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def tokenizer():
    t = "fuzz_tokenizer"
    base = {tok: i for i, tok in enumerate(byte_tokens())}
    extra = ["he", "ll", "hell", "hello", "\u0120w", "or", "\u0120wor", "ld", "\u0120world", "\u0120t", "\u0120the",
             "\u0120th", "12", "123"]
    v = dict(base)
    for e in extra:
        v[e] = len(v)
    merges = ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld", "\u0120 t",
              "\u0120t h", "\u0120th e", "1 2", "12 3"]
    v_eot = dict(v)
    v_eot["<|endoftext|>"] = len(v_eot)
    enc = lambda d: json.dumps(d, ensure_ascii=False)
    put(t, "bytes_only", enc(base))
    put(t, "merges", enc(v) + "\n#merges\n#version: 0.2\n" + "\n".join(merges) + "\n")
    put(t, "merges_eot", enc(v_eot) + "\n#merges\n#version: 0.2\n" + "\n".join(merges) + "\n")
    put(t, "escaped", json.dumps(v_eot) + "\n#merges\n" + "\n".join(merges[:4]))
    put(t, "missing_byte", enc({k: i for i, k in enumerate(byte_tokens()[1:])}))


# ---- JSONL examples (load_examples, jsonl_kind, load_mc_jsonl) ------------------------------------------
def jsonl():
    t = "fuzz_jsonl"
    lines = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    put(t, "pc.jsonl", lines([{"prompt": "the abc", "completion": " the end"}, {"prompt": "", "completion": "ab"},
                              {"prompt": "hello world " * 6, "completion": " he"}]))
    put(t, "mc.jsonl", lines([{"prompt": "Q: abc?", "choices": [" yes", " no"], "label": 0},
                              {"prompt": "Q: the?", "choices": [" yes", " no"], "label": 1}]))
    put(t, "mc_nolabel.jsonl", lines([{"prompt": "x", "choices": [" a", " ab", " abc"]},
                                      {"prompt": "", "choices": ["\u00e9t\u00e9", " the"]}]))
    put(t, "pc_unicode.jsonl", lines([{"prompt": "caf\u00e9 \u2603", "completion": " \U0001F600<|endoftext|>"}])
        + "\n" + json.dumps({"prompt": "a\tb\\n", "completion": "c"}) + "\r\n")
    put(t, "mc_long.jsonl", lines([{"prompt": "the " * 40, "choices": [" ab", " abc"], "label": 1}]))


# ---- deep_mc target files (load_target) --------------------------------------------------------------
def deep_mc():
    t = "fuzz_deep_mc_target"
    put(t, "d2.txt", "deep_mc_target 1\n# M = U V^T; observed entries are 0-based (row, column)\n"
                     "d 2\nrank 1\nU\n1\n2\nV\n0.5\n-1\nobserved 3\n0 0\n0 1\n1 1\n")
    put(t, "d4r2.txt", "deep_mc_target 1\nd 4\nrank 2\nU\n1 0\n0 1\n1 1\n-1 2.5e-1\nV\n0.1 0.2\n0.3 0.4\n"
                       "0.5 0.6\n0.7 0.8\nobserved 5\n0 0\n1 2\n2 3\n3 1\n3 3\n\n# end\n")
    put(t, "d3_comments.txt", "deep_mc_target 1\n\n  d 3   # size\nrank 1\nU\n1e0\n-2\n3.25\nV\n1\n1\n1\n"
                              "observed 1\n2 0\n")
    put(t, "dup.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\n2\nobserved 2\n0 1\n0 1\n")


def main():
    config()
    st()
    shards()
    tokenizer()
    jsonl()
    deep_mc()
    for t in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, t))
        size = sum(os.path.getsize(os.path.join(CORPUS, t, f)) for f in files)
        print(f"{t}: {len(files)} files, {size} bytes")


if __name__ == "__main__":
    main()
