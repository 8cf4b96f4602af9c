#!/usr/bin/env python3
"""Golden outputs of llama.cpp on the pinned SmolLM2 GGUF re-quantized by llama.cpp itself.

For each target type (--types, default Q4_0 Q4_K_M Q5_K_M Q6_K F16) this script
  * re-quantizes the pinned Q4_1 file with llama.cpp's own quantizer
    (`llama_model_quantize`, allow_requantize, no importance matrix), which chooses each
    tensor's type (the k-quant mixes, and their fallbacks for rows not a multiple of 256);
  * rebuilds the file with those types through ragtune's `requantize` example (candle's
    quantizers: byte for byte llama.cpp's for Q4_0/Q5_0/Q5_1/Q8_0/F16, a close variant for the
    k-quants), so that the tests can rebuild the very same file without llama.cpp, and records
    each tensor's type and sha256 (read with the `gguf` package) and whether llama.cpp's own
    quantizer wrote the same bytes;
  * runs llama.cpp greedily on that file, on the chat prompts of smollm2_q4_1.json (their
    prompt ids), 32 tokens each, recording the ids and the top-1/top-2 logit margins.

Writes GOLDEN/smollm2_requant.json (GOLDEN: --golden, ANCHORS_GOLDEN, else ../../tests/golden).
Needs llama-cpp-python 0.3.36 and gguf (see README.md) and
`cargo build --release -p ragtune-generate --example requantize`; runs in about 2 minutes.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import pathlib
import subprocess
import tempfile

import numpy as np

import common

HERE = pathlib.Path(__file__).resolve().parent
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q5_K_M": 17, "Q4_K_M": 15, "Q6_K": 18, "F16": 1}


def quantize(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({ftype}) failed: {rc}")


def tensors(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = []
    for t in reader.tensors:
        data = np.ascontiguousarray(t.data).tobytes()
        out.append({
            "name": t.name,
            "type": gguf.GGMLQuantizationType(t.tensor_type).name,
            "shape": [int(x) for x in t.shape],
            "sha256": hashlib.sha256(data).hexdigest(),
        })
    return out


def greedy(path, cases, max_new=32):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2,
                n_threads_batch=2, verbose=False, seed=0)
    out = []
    for c in cases:
        ids, margins = common.greedy_with_margins(llm, c["prompt_ids"], max_new)
        out.append({"prompt_ids": c["prompt_ids"], "greedy_ids": ids,
                    "top1_top2_logit_margin": margins})
    return out


def main():
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the pinned SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "F16"])
    ap.add_argument("--requantize", default=str(HERE.parent.parent / "target/release/examples/requantize"))
    ap.add_argument("--golden", default=os.environ.get("ANCHORS_GOLDEN", str(HERE.parent.parent / "tests/golden")))
    args = ap.parse_args()
    golden = pathlib.Path(args.golden)
    base = json.loads((golden / "smollm2_q4_1.json").read_text())
    cases = base["chat"]["cases"]
    src = pathlib.Path(args.gguf)
    result = {
        "source_file": src.name,
        "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "source_package": base["source_package"],
        "produced_by": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp vendored): "
                       "llama_model_quantize (allow_requantize, no imatrix), then greedy decoding "
                       "with n_threads=2, n_batch=n_ubatch=512, n_ctx=1024",
        "prompts": "the chat cases of smollm2_q4_1.json (their prompt_ids)",
        "files": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in args.types:
            theirs = pathlib.Path(tmp) / f"llama-cpp-{ftype}.gguf"
            quantize(src, theirs, ftype)
            their_tensors = {t["name"]: t for t in tensors(theirs)}
            plan = pathlib.Path(tmp) / f"plan-{ftype}.json"
            plan.write_text(json.dumps({n: t["type"] for n, t in their_tensors.items()}))
            ours = pathlib.Path(tmp) / f"ragtune-{ftype}.gguf"
            subprocess.run([args.requantize, str(src), str(ours), str(plan)], check=True)
            our_tensors = tensors(ours)
            for t in our_tensors:
                t["same_as_llama_cpp_quantizer"] = t["sha256"] == their_tensors[t["name"]]["sha256"]
                del t["shape"]
            result["files"][ftype] = {
                "llama_cpp_file_bytes": theirs.stat().st_size,
                "tensors": our_tensors,
                "cases": greedy(ours, cases),
            }
            same = sum(t["same_as_llama_cpp_quantizer"] for t in our_tensors)
            print(ftype, f"{same}/{len(our_tensors)} tensors as llama.cpp quantizes them", flush=True)
    (golden / "smollm2_requant.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
