#!/usr/bin/env python3
"""Retrieval quality of `ragtune search` on the anchors' 1,000 dev queries.

Each query is a LicenseDB `.RULE` text (front matter removed, whitespace collapsed to single
spaces so that it fits on one line); its answer is the rule's `license_expression` (one
license key). A query is a hit at k when any of the top-k chunks has that key as `doc_id`.
Reports recall@1/5/10 and MRR@10, overall and by rule type, as
`benches/anchors/retrieval_anchor.py` does. Standard library only.

    python3 benches/retrieval_eval.py [--ragtune target/release/ragtune] [--modes dense,lexical,hybrid]
                                      [-- extra global ragtune args, e.g. --index DIR]

Runs each `--retrieval` mode over the same queries and prints one Markdown table with the
anchor's numbers (`benches/anchors/results/retrieval_anchor.json`) beside them.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def front_matter(text):
    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    meta = {}
    for line in text[3:end].splitlines():
        if ":" in line and not line.startswith((" ", "-")):
            k, v = line.split(":", 1)
            meta[k.strip()] = v.strip()
    body = text[end + 4:]
    return meta, body


def rule_type(meta):
    for flag, name in (("is_license_notice", "notice"), ("is_license_reference", "reference"),
                       ("is_license_text", "text"), ("is_license_tag", "tag")):
        if meta.get(flag) in ("yes", "true"):
            return name
    return "other"


def run_mode(a, queries, mode):
    cmd = [a.ragtune, "--quiet", *a.extra, "search", "--format", "json", "-k", "10", "--retrieval", mode]
    t = time.perf_counter()
    out = subprocess.run(cmd, input="\n".join(q["text"] for q in queries) + "\n", capture_output=True,
                         text=True, check=True)
    secs = time.perf_counter() - t
    lines = out.stdout.rstrip("\n").split("\n")  # not splitlines(): hits may hold U+2028
    assert len(lines) == len(queries), (len(lines), len(queries))
    ranks = []
    for q, line in zip(queries, lines):
        docs = [h["doc_id"] for h in json.loads(line)["hits"]]
        ranks.append(docs.index(q["key"]) + 1 if q["key"] in docs else None)

    def summary(idx):
        n = len(idx)
        r = [ranks[i] for i in idx]
        res = {f"recall@{k}": round(sum(1 for x in r if x and x <= k) / n, 3) for k in (1, 5, 10)}
        res["mrr@10"] = round(sum(1 / x for x in r if x) / n, 3)
        res["n"] = n
        return res

    return {"command": " ".join(cmd[1:]), "wall_s": round(secs, 1),
            "ms_per_query": round(1000 * secs / len(queries), 2),
            "all": summary(range(len(queries))),
            "by_type": {t: summary([i for i, q in enumerate(queries) if q["type"] == t])
                        for t in sorted({q["type"] for q in queries})}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ragtune", default=str(ROOT / "target/release/ragtune"))
    ap.add_argument("--rules", default=str(ROOT / "models/licensedcode-data-32.1.0/rules"))
    ap.add_argument("--queries", default=str(HERE / "anchors/queries_dev.txt"))
    ap.add_argument("--anchor", default=str(HERE / "anchors/results/retrieval_anchor.json"))
    ap.add_argument("--modes", default="dense,lexical,hybrid")
    ap.add_argument("--out", help="write the JSON result here too")
    ap.add_argument("extra", nargs="*", help="extra global arguments for `ragtune` (after --)")
    a = ap.parse_args()

    names = [l.strip() for l in open(a.queries) if l.strip() and not l.startswith("#")]
    queries = []
    for name in names:
        meta, body = front_matter(open(pathlib.Path(a.rules) / name, encoding="utf-8").read())
        queries.append({"file": name, "key": meta.get("license_expression", ""), "type": rule_type(meta),
                        "text": " ".join(body.split())})
    result = {"queries": len(queries), "modes": {}}
    for mode in a.modes.split(","):
        result["modes"][mode] = run_mode(a, queries, mode)
        print(json.dumps({mode: result["modes"][mode]}), file=sys.stderr)
    rows = []
    try:
        anchor = json.load(open(a.anchor))
        for key, label in (("dense_minilm", "anchor: dense MiniLM, exact, 200-word passages"),
                           ("bm25", "anchor: BM25 (bm25s)"), ("rrf", "anchor: RRF of dense + BM25")):
            r = anchor[key]
            rows.append((label, r["recall@1"], r["recall@5"], r["recall@10"], r["mrr@10"], ""))
    except (OSError, KeyError, ValueError):
        pass
    for mode, r in result["modes"].items():
        x = r["all"]
        notice = r["by_type"].get("notice", {}).get("recall@5", "")
        rows.append((f"ragtune --retrieval {mode}", x["recall@1"], x["recall@5"], x["recall@10"], x["mrr@10"],
                     f"{notice} | {r['ms_per_query']}"))
    print("| | recall@1 | recall@5 | recall@10 | MRR@10 | notice recall@5 | ms/query |")
    print("|---|---|---|---|---|---|---|")
    for label, r1, r5, r10, mrr, rest in rows:
        print(f"| {label} | {r1} | {r5} | {r10} | {mrr} | {rest or ' | '} |")
    types = sorted({t for r in result["modes"].values() for t in r["by_type"]})
    print("\nrecall@5 by rule type:\n")
    print("| mode | " + " | ".join(f"{t} (n={result['modes'][next(iter(result['modes']))]['by_type'][t]['n']})" for t in types) + " |")
    print("|---|" + "---|" * len(types))
    for mode, r in result["modes"].items():
        print(f"| {mode} | " + " | ".join(str(r["by_type"][t]["recall@5"]) for t in types) + " |")
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
