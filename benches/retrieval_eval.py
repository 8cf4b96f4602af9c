#!/usr/bin/env python3
"""Retrieval quality of `ragtune search` on the anchors' 1,000 dev queries.

Each query is a LicenseDB `.RULE` text (front matter removed, whitespace collapsed to single
spaces so that it fits on one line); its answer is the rule's `license_expression` (one
license key). A query is a hit at k when any of the top-k chunks has that key as `doc_id`.
Reports recall@1/5/10 and MRR@10, overall and by rule type, as
`benches/anchors/retrieval_anchor.py` does. Standard library only.

    python3 benches/retrieval_eval.py [--ragtune target/release/ragtune] [-- extra ragtune args]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ragtune", default=str(ROOT / "target/release/ragtune"))
    ap.add_argument("--rules", default=str(ROOT / "models/licensedcode-data-32.1.0/rules"))
    ap.add_argument("--queries", default=str(HERE / "anchors/queries_dev.txt"))
    ap.add_argument("--out", help="write the JSON result here too")
    ap.add_argument("extra", nargs="*", help="extra arguments for `ragtune search` (after --)")
    a = ap.parse_args()

    names = [l.strip() for l in open(a.queries) if l.strip() and not l.startswith("#")]
    queries = []
    for name in names:
        meta, body = front_matter(open(pathlib.Path(a.rules) / name, encoding="utf-8").read())
        queries.append({"file": name, "key": meta.get("license_expression", ""), "type": rule_type(meta),
                        "text": " ".join(body.split())})
    cmd = [a.ragtune, "--quiet", *a.extra, "search", "--format", "json", "-k", "10"]
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

    result = {"queries": len(queries), "command": " ".join(cmd[1:]), "wall_s": round(secs, 1),
              "all": summary(range(len(queries))),
              "by_type": {t: summary([i for i, q in enumerate(queries) if q["type"] == t])
                          for t in sorted({q["type"] for q in queries})}}
    print(json.dumps(result))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
