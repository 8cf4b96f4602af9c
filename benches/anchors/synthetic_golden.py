#!/usr/bin/env python3
"""Tiny synthetic GGUF models for the architecture variants no pinned file covers, and
llama.cpp's logits on them.

Writes, with the `gguf` package, two F32 models of 2 blocks, 32 wide, 2 query heads over 1
KV head of 16 dimensions, a 64-wide SwiGLU and a 260-token byte-level vocabulary, weights
drawn from numpy's default_rng(seed):
  * tiny-qwen2.gguf: `general.architecture = qwen2` (q/k/v biases, NeoX RoPE);
  * tiny-llama3-rope-freqs.gguf: `llama` with a `rope_freqs.weight` tensor (Llama 3.1's
    per-frequency RoPE divisors), and an untied `output.weight`.
Then runs llama.cpp (llama-cpp-python 0.3.36, n_threads=2, default f16 KV cache) on a fixed
16-token sequence and records the logits of every position.

A third file, tiny-llama-spm.gguf, carries a SentencePiece vocabulary
(`tokenizer.ggml.model = llama`: pieces, scores, token types, byte fallback), trained with
the `sentencepiece` package (0.2.x; BPE, 1,000 pieces, Llama 2's options: split digits, byte
fallback, no whitespace normalisation) on 300 license texts of the pinned corpus (--corpus),
with the same tiny weights; llama.cpp's token ids for the tokenizer strings of
smollm2_q4_1.json and a few more (`tokenize(text, add_bos=False, special=False)`, and
`special=True` where different) are recorded for it.

Output: GOLDEN/tiny-*.gguf and GOLDEN/synthetic.json (GOLDEN: --golden, ANCHORS_GOLDEN,
else ../../tests/golden). Runs in seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 256]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF, BLOCKS = 32, 2, 1, 16, 64, 2


def byte_vocab():
    # GPT-2's byte-to-unicode map, so each of the 256 bytes is one token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    tokens = [table[b] for b in range(256)] + ["ab", "<s>", "</s>", "<pad>"]
    return tokens


def add_shape(writer, blocks):
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)


def add_blocks(writer, w, blocks, qkv_bias):
    """The decoder blocks' tensors, drawn from `w` in a fixed order (the files' bytes depend
    on it)."""
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(blocks):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", (1.0 + w(HIDDEN, s=0.1)).astype(np.float32))
        writer.add_tensor(b + "attn_q.weight", w(q_out, HIDDEN))
        writer.add_tensor(b + "attn_k.weight", w(kv_out, HIDDEN))
        writer.add_tensor(b + "attn_v.weight", w(kv_out, HIDDEN))
        if qkv_bias:
            writer.add_tensor(b + "attn_q.bias", w(q_out, s=0.5))
            writer.add_tensor(b + "attn_k.bias", w(kv_out, s=0.5))
            writer.add_tensor(b + "attn_v.bias", w(kv_out, s=0.5))
        writer.add_tensor(b + "attn_output.weight", w(HIDDEN, q_out))
        writer.add_tensor(b + "ffn_norm.weight", (1.0 + w(HIDDEN, s=0.1)).astype(np.float32))
        writer.add_tensor(b + "ffn_gate.weight", w(FF, HIDDEN))
        writer.add_tensor(b + "ffn_up.weight", w(FF, HIDDEN))
        writer.add_tensor(b + "ffn_down.weight", w(HIDDEN, FF))


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write(path, arch, seed):
    import gguf

    rng = np.random.default_rng(seed)
    w = lambda *shape, s=0.3: (rng.standard_normal(shape) * s).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), arch)
    add_shape(writer, BLOCKS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    tokens = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", w(vocab, HIDDEN, s=1.0))
    writer.add_tensor("output_norm.weight", (1.0 + w(HIDDEN, s=0.1)).astype(np.float32))
    if arch == "llama":
        writer.add_tensor("output.weight", w(vocab, HIDDEN))
        # Llama 3.1's factors: 1 for the high frequencies, up to 8 for the low ones.
        writer.add_tensor("rope_freqs.weight", np.array([1, 1, 1, 1.5, 2, 4, 6, 8], dtype=np.float32))
    add_blocks(writer, w, BLOCKS, qkv_bias=arch == "qwen2")
    finish(writer)


SPM_EXTRA = [
    "",
    " ",
    "  two leading spaces and trailing  ",
    "MIT License\n\nCopyright (c) <year> <copyright holders>",
    "<s>special</s> text <unk>",
    "Ελληνικά и русский язык, 日本語 ✓",
    "1234567890 and 3.14",
]


def train_spm(corpus, out_prefix):
    import sentencepiece as spm

    files = sorted((pathlib.Path(corpus) / "licenses").glob("*.LICENSE"))[:300]
    text = pathlib.Path(out_prefix + ".txt")
    with text.open("w") as f:
        for p in files:
            body = p.read_text(errors="replace").split("---", 2)[-1]
            for line in body.splitlines():
                if line.strip():
                    f.write(line + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=out_prefix, model_type="bpe", vocab_size=1000,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=0.9995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=out_prefix + ".model")


def write_spm(path, sp, seed):
    import gguf

    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    types = []
    for i in range(n):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    rng = np.random.default_rng(seed)
    w = lambda *shape, s=0.3: (rng.standard_normal(shape) * s).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    add_shape(writer, 1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", w(n, HIDDEN, s=1.0))
    writer.add_tensor("output_norm.weight", (1.0 + w(HIDDEN, s=0.1)).astype(np.float32))
    add_blocks(writer, w, 1, qkv_bias=False)
    finish(writer)


def tokenize_cases(path, strings):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    cases = []
    for text in strings:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        special = llm.tokenize(text.encode(), add_bos=False, special=True)
        case = {"text": text, "ids": ids}
        if special != ids:
            case["ids_parse_special"] = special
        case["detokenized"] = llm.detokenize(ids).decode("utf-8", "replace")
        cases.append(case)
    return cases


def logits(path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                n_threads_batch=2, logits_all=True, verbose=False, seed=0)
    llm.eval(TOKENS)
    return [[round(float(v), 5) for v in llm.scores[i]] for i in range(len(TOKENS))]


def main():
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "models/licensedcode-data-32.1.0"))
    ap.add_argument("--golden", default=os.environ.get("ANCHORS_GOLDEN", str(HERE.parent.parent / "tests/golden")))
    args = ap.parse_args()
    golden = pathlib.Path(args.golden)
    out = {
        "produced_by": f"gguf-py (the model files) and llama-cpp-python {llama_cpp.__version__} "
                       "(llama.cpp vendored; the logits), CPU, n_threads=2, f16 KV cache",
        "tokens": TOKENS,
        "models": {},
    }
    for name, arch, seed in [("tiny-qwen2.gguf", "qwen2", 7), ("tiny-llama3-rope-freqs.gguf", "llama", 8)]:
        path = golden / name
        write(path, arch, seed)
        out["models"][name] = {
            "architecture": arch,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "logits": logits(path),
        }
        print(name, path.stat().st_size, "bytes")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sp = train_spm(args.corpus, str(pathlib.Path(tmp) / "spm"))
        path = golden / "tiny-llama-spm.gguf"
        write_spm(path, sp, 9)
    base = json.loads((golden / "smollm2_q4_1.json").read_text())
    strings = [c["text"] for c in base["tokenize"]] + SPM_EXTRA
    out["spm"] = {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "tokenize": tokenize_cases(path, strings),
    }
    print(path.name, path.stat().st_size, "bytes")
    (golden / "synthetic.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
