#!/usr/bin/env python3
"""Reference checks against transformers, run on the GPU machine (needs torch + transformers).

  fixture DIR            make the tiny GPT-2 fixture that tests/test_gpt.cpp checks against:
                         DIR/config.json + model.safetensors (save_pretrained) and
                         DIR/expected.safetensors (input_ids, labels, logits, loss, grads in
                         deeplora's [out, in] layout, losses of 10 AdamW steps). f32 on the CPU.
  logits MODEL_DIR IDS OUT   logits of an HF model dir for the input_ids in IDS (safetensors)
  compare A B KEY TOL    relative error of tensor KEY between two safetensors files <= TOL
  peft_fixture BASE OUT  a PEFT LoRA (r=4, alpha=8, c_attn/c_proj/c_fc, fan_in_fan_out) on the HF
                         model BASE with random nonzero B: OUT/adapter (save_pretrained) and
                         OUT/expected.safetensors (logits, loss, lora grads in deeplora's names)
  peft_logits BASE ADAPTER IDS OUT   logits of PeftModel.from_pretrained(BASE, ADAPTER)
  tokenizer VOCAB_DIR TEXT SHARD   GPT2TokenizerFast ids of TEXT == the llm.c shard made by
                         deeplora's `tokenize` (documents separated by <|endoftext|>)
  evalgen_fixture MODEL_DIR OUT   on the HF model MODEL_DIR (the tiny fixture: vocab 512, so a byte
                         tokenizer, id = byte value, covers it): 240 multiple-choice examples with
                         transformers' summed log-probability of every choice, and 16 prompts with
                         model.generate(do_sample=False, 64 new tokens); OUT = a JSON file that
                         tests/test_eval.cpp checks eval and generate against (f32)
  llama_fixture DIR      the tiny Llama-family fixtures tests/test_llama.cpp checks against:
                         DIR/llama (LlamaForCausalLM: GQA 4/2 heads, head_dim 8, untied head, llama3
                         rope_scaling) and DIR/qwen2 (Qwen2ForCausalLM: q/k/v biases, tied head), each
                         config.json + model.safetensors + expected.safetensors as `fixture` (grads
                         under deeplora's names: without the "model." prefix, nn.Linear [out, in]).
                         Random init, then every parameter perturbed (norms not 1, biases not 0).
  tokenizer_json_fixture DIR   two byte-level BPE tokenizers (vocab 2000) trained with HF tokenizers
                         on ~1 MB of /usr/share/common-licenses + /usr/share/doc text, for
                         tests/test_tokenizer_json.cpp: DIR/llama3_style (Llama 3's Split pattern,
                         ByteLevel without regex, ignore_merges, specials <|begin_of_text|> and
                         <|end_of_text|> after the vocab, a BOS template, non-special <think>) and
                         DIR/qwen2_style (NFC, Qwen2's pattern, specials <|endoftext|> and <|im_start|>
                         trained into the vocab, a normalized non-special token); each tokenizer.json
                         + expected.json: HF's ids (add_special_tokens=False) of hostile strings (also
                         with encode_special_tokens) and of the training text's first 128 Ki
                         characters. Needs only the tokenizers package.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def fixture(out):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).float()
    model.config._attn_implementation = "eager"
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 16), generator=g)
    labels = torch.randint(0, 512, (2, 16), generator=g)
    labels[0, :3] = -100  # masked positions
    model.train()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    exp = {"input_ids": ids.to(torch.int32), "labels": labels.to(torch.int32),
           "logits": logits.detach().contiguous(), "loss": loss.detach().reshape(())}
    for name, p in model.transformer.named_parameters():
        gr = p.grad.detach()
        if name.endswith(CONV1D):
            gr = gr.t()
        exp["grad." + name] = gr.contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-8)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        lg = model(input_ids=ids).logits
        l = torch.nn.functional.cross_entropy(lg.reshape(-1, 512), labels.reshape(-1), ignore_index=-100)
        losses.append(l.item())
        l.backward()
        opt.step()
    exp["adamw_losses"] = torch.tensor(losses, dtype=torch.float64)
    save_file(exp, os.path.join(out, "expected.safetensors"))
    print(json.dumps({"fixture": out, "loss": loss.item(), "adamw_last": losses[-1]}))


def llama_fixture(out):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    V = 50
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, attention_dropout=0.0)
    makes = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            **common, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16})),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
            **common, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    }
    summary = {}
    for name, make in makes.items():
        torch.manual_seed(0)
        model = make().float()
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, V, (2, 16), generator=g)
        labels = torch.randint(0, V, (2, 16), generator=g)
        labels[0, :3] = -100
        model.train()
        lg = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        exp = {"input_ids": ids.to(torch.int32), "labels": labels.to(torch.int32),
               "logits": lg.detach().contiguous(), "loss": loss.detach().reshape(())}
        for pname, p in model.named_parameters():
            key = pname[len("model."):] if pname.startswith("model.") else pname
            exp["grad." + key] = p.grad.detach().contiguous()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-8)
        losses = []
        for _ in range(10):
            opt.zero_grad()
            l = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.reshape(-1, V), labels.reshape(-1),
                                                  ignore_index=-100)
            losses.append(l.item())
            l.backward()
            opt.step()
        exp["adamw_losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(exp, os.path.join(d, "expected.safetensors"))
        summary[name] = {"loss": loss.item(), "adamw_last": losses[-1]}
    print(json.dumps({"llama_fixture": out, **summary}))


def logits(model_dir, ids_file, out):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = load_file(ids_file)["input_ids"].long()
    with torch.no_grad():
        lg = model(input_ids=ids).logits
    save_file({"logits": lg.contiguous()}, out)


def compare(a, b, key, tol):
    x = load_file(a)[key].double()
    y = load_file(b)[key].double()
    err = ((x - y).norm() / y.norm()).item()
    ok = err <= float(tol)
    print(json.dumps({"compare": key, "a": a, "b": b, "rel_err": err, "tol": float(tol), "ok": ok}))
    return 0 if ok else 1


def peft_fixture(base, out):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel.from_pretrained(base, torch_dtype=torch.float32)
    model.config._attn_implementation = "eager"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)  # nonzero, so the adapter changes the output
    os.makedirs(out, exist_ok=True)
    pm.save_pretrained(os.path.join(out, "adapter"), safe_serialization=True)
    ex = load_file(os.path.join(base, "expected.safetensors"))
    ids, labels = ex["input_ids"].long(), ex["labels"].long()
    logits = pm(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    exp = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(())}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            # base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight -> h.0.attn.c_attn.lora.A
            mod = n.split("transformer.", 1)[1].split(".lora_")[0]
            which = "A" if ".lora_A." in n else "B"
            exp[f"grad.{mod}.lora.{which}"] = p.grad.detach().contiguous()
    save_file(exp, os.path.join(out, "expected.safetensors"))
    print(json.dumps({"peft_fixture": out, "loss": loss.item(), "lora_tensors": len(exp) - 2}))


def peft_logits(base, adapter, ids_file, out):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base, torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter).eval()
    ids = load_file(ids_file)["input_ids"].long()
    with torch.no_grad():
        lg = pm(input_ids=ids).logits
    save_file({"logits": lg.contiguous()}, out)


def tokenizer(vocab_dir, text_file, shard):
    from transformers import GPT2TokenizerFast

    vocab, merges = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
    tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    used = "transformers.GPT2TokenizerFast(vocab_file, merges_file)"
    if tok("Hello world")["input_ids"] != [15496, 995]:
        # transformers 5 changed the constructor; build the same fast tokenizer as GPT2TokenizerFast does.
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        t = Tokenizer(models.BPE.from_file(vocab, merges))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=t)
        used = "PreTrainedTokenizerFast(BPE.from_file + ByteLevel), as GPT2TokenizerFast builds it"
    assert tok("Hello world")["input_ids"] == [15496, 995], "reference tokenizer is broken"
    with open(text_file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # deeplora's tokenize puts <|endoftext|> before each document (as llm.c's scripts do).
    ref = [50256] + tok(text)["input_ids"]
    data = np.fromfile(shard, dtype=np.uint8)
    header = np.frombuffer(data[:1024].tobytes(), dtype=np.int32)
    ours = np.frombuffer(data[1024:].tobytes(), dtype=np.uint16)[: header[2]].tolist()
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    ok = ours == ref
    print(json.dumps({"tokenizer": text_file, "reference": used, "bytes": len(text.encode()), "ids": len(ref), "ours": len(ours),
                      "identical": ok, "first_mismatch": first}))
    return 0 if ok else 1


def evalgen_fixture(model_dir, out):
    """Multiple-choice log-probs and greedy generations of transformers on byte-id text."""
    import random

    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    rng = random.Random(7)
    words = ["apple", "river", "stone", "cloud", "night", "green", "table", "song", "quick", "brown", "fox"]
    choice_sets = [[" yes", " no"], [" ya", " yb", " no", " maybe"], [" red", " green", " blue"],
                   [" a", " bb", " ccc", " dddd", " e"]]
    examples = []
    with torch.no_grad():
        for i in range(240):
            prompt = f"Q{i}:" + "".join(" " + rng.choice(words) for _ in range(rng.randint(0, 12))) + "\nA:"
            choices = choice_sets[i % len(choice_sets)]
            label = rng.randrange(len(choices))
            p = list(prompt.encode())
            lps = []
            for c in choices:
                ids = p + list(c.encode())
                logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
                lsm = torch.log_softmax(logits, dim=-1)
                lps.append(sum(lsm[len(p) - 1 + j, ids[len(p) + j]].item() for j in range(len(c.encode()))))
            examples.append({"prompt": prompt, "choices": choices, "label": label, "logprobs": lps})
        gens = []
        for i in range(16):
            ids = [rng.randrange(256) for _ in range(1 + (i * 5) % 23)]
            g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
            gens.append({"prompt": ids, "tokens": g[0, len(ids):].tolist()})
    with open(out, "w") as f:
        json.dump({"model": model_dir, "dtype": "float32", "examples": examples, "generate": gens}, f)
    print(json.dumps({"evalgen_fixture": out, "examples": len(examples), "generations": len(gens)}))


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Texts that stress the pre-tokenizer, the normalizer and the added tokens.
HOSTILE = [
    "I'll  go\n\n  to   the store's 123 café 🙂",
    "a\u0085b\u180ec\u3000 d\t\n",
    "a\u180e\u180ez \u180e\u180e x\u0085\u0085 y",
    "Don't STOP: x=1.5e-3; y's!! HE'S WE'RE we'Ll I'M THEY'D",
    "line one\r\nline two\r\n\r\n  \r\n\tindented\r\n",
    "x  \ny x!!\n\ny $hello \u3000x",
    "e\u0301 A\u030a \u1100\u1161 n\u0303o \u00e9 \u212b \u1e9b\u0323",  # combining marks, Hangul jamo, singletons
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag \U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd",
    "0 12 345 6789 1234567890 3.14159 1,000,000 \u0661\u0662\u0663\u0664 \u00bd \u2167",
    "      leading and trailing      ",
    "\n\n\n\t\t\t   \u2003\u2003x\u00a0\u00a0y\u202f\u2028z\u2029",
    "<|begin_of_text|>Hello<|end_of_text|> <|begin_of_text|",
    "<|im_start|>user\nhi there<|endoftext|><|im_start|>assistant\n",
    "<think>why</think> <think> think> cafe\u0301 au lait, caf\u00e9 au lait",
    "$$$ ((( ))) ... !!! ??? --- ___ a--b c__d ~`^",
    "nul\0byte",
    "",
]


def _license_text(limit):
    """About `limit` characters of English: Debian's licenses, then the packages' copyright files."""
    import glob

    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright"))
    parts, n = [], 0
    for path in files:
        if n >= limit or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            t = f.read()
        parts.append(t)
        n += len(t)
    return "".join(parts)


def tokenizer_json_fixture(out):
    import tokenizers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    text = _license_text(1 << 20)
    assert len(text) > 200_000, f"only {len(text)} characters of training text"
    chunks = text.split("\n\n")
    specs = {
        "llama3_style": dict(pattern=LLAMA3_PATTERN, nfc=False, ignore_merges=True,
                             specials=["<|begin_of_text|>", "<|end_of_text|>"], specials_in_vocab=False,
                             extra=AddedToken("<think>", special=False, normalized=False), bos="<|begin_of_text|>"),
        "qwen2_style": dict(pattern=QWEN2_PATTERN, nfc=True, ignore_merges=False,
                            specials=["<|endoftext|>", "<|im_start|>"], specials_in_vocab=True,
                            extra=AddedToken("cafe\u0301 au lait", special=False, normalized=True), bos=None),
    }
    summary = {}
    for name, sp in specs.items():
        tok = Tokenizer(models.BPE())
        if sp["nfc"]:
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(sp["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=sp["specials"] if sp["specials_in_vocab"] else [])
        tok.train_from_iterator(chunks, trainer=trainer)
        if not sp["specials_in_vocab"]:
            tok.add_special_tokens(sp["specials"])  # ids after the model's vocab, as Llama 3's
        tok.add_tokens([sp["extra"]])
        if sp["bos"]:
            bos = sp["bos"]
            tok.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                              special_tokens=[(bos, tok.token_to_id(bos))])])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        # ignore_merges through the JSON (the trainer keeps a fresh model's default); read back to
        # make sure this tokenizers version knows it.
        j = json.loads(tok.to_str())
        j["model"]["ignore_merges"] = sp["ignore_merges"]
        tok = Tokenizer.from_str(json.dumps(j))
        assert json.loads(tok.to_str())["model"].get("ignore_merges", False) == sp["ignore_merges"], \
            f"tokenizers {tokenizers.__version__} does not keep ignore_merges"
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "tokenizer.json")
        tok.save(path)
        tok = Tokenizer.from_file(path)  # the ids of exactly the file deeplora reads

        def ids(s, ordinary=False):
            if not ordinary:
                return tok.encode(s, add_special_tokens=False).ids
            tok.encode_special_tokens = True  # special tokens as text: deeplora's allow_special = false
            try:
                return tok.encode(s, add_special_tokens=False).ids
            finally:
                tok.encode_special_tokens = False

        ordinary = hasattr(tok, "encode_special_tokens")  # tokenizers >= 0.15
        cases = []
        for s in HOSTILE:
            c = {"text": s, "ids": ids(s)}
            if ordinary:
                c["ids_ordinary"] = ids(s, ordinary=True)
            cases.append(c)
        sample = text[: 1 << 17]  # kept small: the fixture is committed
        cases.append({"text": sample, "ids": ids(sample)})
        vocab = tok.get_vocab(with_added_tokens=True)
        exp = {"tokenizers_version": tokenizers.__version__, "nfc": sp["nfc"], "vocab_size": max(vocab.values()) + 1,
               "bos_id": tok.token_to_id(sp["bos"]) if sp["bos"] else None, "cases": cases}
        with open(os.path.join(d, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(exp, f, ensure_ascii=False)
        summary[name] = {"vocab_size": exp["vocab_size"], "ids": sum(len(c["ids"]) for c in cases),
                         "ignore_merges": sp["ignore_merges"], "ordinary_checked": ordinary}
    print(json.dumps({"tokenizer_json_fixture": out, "tokenizers": tokenizers.__version__, "training_chars": len(text),
                      **summary}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fixture":
        fixture(*args)
    elif cmd == "logits":
        logits(*args)
    elif cmd == "compare":
        sys.exit(compare(*args))
    elif cmd == "peft_fixture":
        peft_fixture(*args)
    elif cmd == "peft_logits":
        peft_logits(*args)
    elif cmd == "tokenizer":
        sys.exit(tokenizer(*args))
    elif cmd == "evalgen_fixture":
        evalgen_fixture(*args)
    elif cmd == "llama_fixture":
        llama_fixture(*args)
    elif cmd == "tokenizer_json_fixture":
        tokenizer_json_fixture(*args)
    else:
        sys.exit(__doc__)
