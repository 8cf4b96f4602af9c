#!/usr/bin/env python3
"""ragtune's HNSW and hnswlib on the same vectors, in one run.

Uses the measuring code of `benches/anchors/ann_anchor.py` (its hnswlib adapter, exact
top-10, recall and timing helpers; M = 16, ef_construction = 200, k = 10) on BASE.npy and
QUERIES.npy, then runs ragtune's `ann_bench` example on the same files, alternating the two
REPEAT times so machine noise hits both. Needs the anchors venv (numpy, hnswlib 0.8.0).

    python benches/ann_side_by_side.py BASE.npy QUERIES.npy [--repeat 3]

To get the vectors: `ragtune ingest`, then `ragtune embed --npy QUERIES.npy < queries.txt`, and
`cargo run --release -p ragtune-index --example ann_bench -- index/licensedb QUERIES.npy
--export-base BASE.npy`.
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "anchors"))
import numpy as np  # noqa: E402
import ann_anchor  # noqa: E402


def hnswlib_run(P, Q, truth):
    ad = ann_anchor.ADAPTERS["hnswlib"]()
    t = time.perf_counter()
    idx = ad.build(P, 2)
    build = time.perf_counter() - t
    path = "/tmp/ann_side_by_side_hnswlib.index"
    ad.save(idx, path)
    loads = []
    for _ in range(5):
        t = time.perf_counter()
        idx = ad.load(path, P.shape[1], P.shape[0])
        loads.append(time.perf_counter() - t)
    out = {"build_s": round(build, 2), "open_ms": round(statistics.median(loads) * 1e3, 2), "at_recall": {}}
    sweep = [(ef, ann_anchor.recall(ad.search(idx, Q, ef, 1), truth)) for ef in ann_anchor.EF_SWEEP]
    for tgt in (0.95, 0.99):
        ef, r = next((e, r) for e, r in sweep if r >= tgt)
        ad.search(idx, Q, ef, 1)
        s = ann_anchor.timed(lambda: ad.search(idx, Q, ef, 1), 5)
        out["at_recall"][str(tgt)] = {"ef": ef, "recall@10": round(r, 4), "qps_1t": round(len(Q) / s)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("queries")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bench", default=str(ROOT / "target/release/examples/ann_bench"))
    a = ap.parse_args()
    P = np.ascontiguousarray(np.load(a.base), dtype=np.float32)
    Q = np.ascontiguousarray(np.load(a.queries), dtype=np.float32)
    truth = ann_anchor.exact_topk(P, Q)
    runs = {"hnswlib": [], "ragtune": []}
    for _ in range(a.repeat):
        runs["hnswlib"].append(hnswlib_run(P, Q, truth))
        out = subprocess.run([a.bench, a.base, a.queries], capture_output=True, text=True, check=True)
        runs["ragtune"].append(json.loads(out.stdout))
    summary = {}
    for tgt in ("0.95", "0.99"):
        h = statistics.median(r["at_recall"][tgt]["qps_1t"] for r in runs["hnswlib"])
        o = statistics.median(r["at_recall"][tgt]["qps_1t"] for r in runs["ragtune"])
        summary[tgt] = {"hnswlib_qps": h, "ragtune_qps": o, "ratio": round(o / h, 2),
                        "hnswlib_ef": runs["hnswlib"][0]["at_recall"][tgt]["ef"],
                        "ragtune_ef": runs["ragtune"][0]["at_recall"][tgt]["ef"]}
    summary["open_ms"] = {"hnswlib": statistics.median(r["open_ms"] for r in runs["hnswlib"]),
                          "ragtune": statistics.median(r["open_ms"] for r in runs["ragtune"])}
    summary["build_s"] = {"hnswlib": statistics.median(r["build_s"] for r in runs["hnswlib"]),
                          "ragtune": statistics.median(r["build_s"] for r in runs["ragtune"])}
    print(json.dumps({"n": P.shape[0], "queries": Q.shape[0], "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
