#!/usr/bin/env python3
"""transformers peers for `generate` and `eval`, run on the GPU machine in the same call as ours
(tools/device_check.sh genbench). Prints one JSON line per measurement.

  gen MODEL_DIR IDS_JSON NEW MODES BATCHES   decode tokens/s of model.generate(do_sample=False) on the
        prompts of IDS_JSON (a list of equal-length token-id lists), NEW new tokens, for each mode in
        MODES (comma list: eager, static_compile) and batch in BATCHES (comma list), bf16.
        decode tokens/s = B * (NEW - 1) / (t(NEW tokens) - t(1 token)): the prefill is taken out.
  eval MODEL_DIR VOCAB_DIR MC_JSONL          a transformers loop that scores a multiple-choice file as
        eval does (summed log-probability of each choice; one padded forward per example), bf16:
        examples/s and accuracy.
"""
import json
import sys
import time

import torch


def load(model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def gen(model_dir, ids_json, new, modes, batches):
    new = int(new)
    prompts = json.load(open(ids_json))
    for mode in modes.split(","):
        model = load(model_dir)
        kw = dict(do_sample=False, pad_token_id=0)
        try:
            if mode == "static_compile":
                model.generation_config.cache_implementation = "static"
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            for b in [int(x) for x in batches.split(",")]:
                ids = torch.tensor(prompts[:b], device="cuda")
                mask = torch.ones_like(ids)
                run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
                for _ in range(3):  # warm-up (and compilation) at both lengths
                    run(1)
                    run(new)
                t1 = min(timed(lambda: run(1)) for _ in range(3))
                tn = min(timed(lambda: run(new)) for _ in range(3))
                print(json.dumps({"peer": "transformers", "mode": mode, "batch": b, "new_tokens": new,
                                  "prompt_tokens": ids.shape[1], "seconds": tn, "prefill_seconds": t1,
                                  "decode_tokens_per_s": b * (new - 1) / (tn - t1)}), flush=True)
        except Exception as e:  # a mode that does not run here is reported, not fatal
            print(json.dumps({"peer": "transformers", "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)


def hf_tokenizer(vocab_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE.from_file(f"{vocab_dir}/vocab.json", f"{vocab_dir}/merges.txt"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    assert t.encode("Hello world").ids == [15496, 995]
    return t


def evaluate(model_dir, vocab_dir, mc_jsonl):
    model = load(model_dir)
    tok = hf_tokenizer(vocab_dir)
    rows = [json.loads(l) for l in open(mc_jsonl) if l.strip()]
    enc = [(tok.encode(r["prompt"]).ids, [tok.encode(c).ids for c in r["choices"]], r["label"]) for r in rows]

    def score(p, cs):
        seqs = [p + c for c in cs]
        L = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=ids.cuda()).logits.float(), dim=-1)
        out = []
        for i, c in enumerate(cs):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c), device="cuda")
            out.append(lsm[i, pos, torch.tensor(c, device="cuda")].sum().item())
        return out

    for p, cs, _ in enc[:5]:
        score(p, cs)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    hits = 0
    for p, cs, label in enc:
        lp = score(p, cs)
        hits += max(range(len(lp)), key=lambda i: lp[i]) == label
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"peer": "transformers loop", "file": mc_jsonl, "examples": len(enc), "seconds": dt,
                      "examples_per_s": len(enc) / dt, "accuracy": hits / len(enc)}), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(*args)
    elif cmd == "eval":
        evaluate(*args)
    else:
        sys.exit(__doc__)
