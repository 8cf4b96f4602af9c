"""Throughput of `ragtune serve` under concurrent clients (issue: batched decoding).

    python3 benches/serve_bench.py http://127.0.0.1:8080 [CLIENTS...]

For each number of concurrent clients (default 1 2 4), every client sends the same greedy
request (`base` mode by default, 128 new tokens) three times; reports per round the median
first-token time (from the `ragtune.timings_ms` extension), the aggregate decode tokens/s
(all generated tokens over the round's wall time) and the ratio to one client.
Start the server with `--max-concurrent` at least the largest client count; set
`batch_decode = false` in ragtune.toml to measure without batching.
"""

import json
import statistics
import sys
import threading
import time
import urllib.request

base = sys.argv[1].rstrip("/")
counts = [int(c) for c in sys.argv[2:]] or [1, 2, 4]
mode = "base"
body = json.dumps(
    {
        "model": mode,
        "messages": [{"role": "user", "content": "Write a long essay about open source licenses."}],
        "max_tokens": 128,
        "temperature": 0,
    }
).encode()


def one():
    req = urllib.request.Request(
        base + "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


one()  # warm-up
rows = []
for n in counts:
    walls, firsts, tokens = [], [], 0
    for _ in range(3):
        results = []
        threads = [threading.Thread(target=lambda: results.append(one())) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        tokens += sum(r["usage"]["completion_tokens"] for r in results)
        firsts += [r["ragtune"]["timings_ms"]["first_token"] for r in results]
    agg = tokens / sum(walls)
    rows.append((n, statistics.median(firsts), agg))
one_agg = rows[0][2]
print("| clients | first token ms (median) | aggregate tokens/s | vs 1 client |")
print("|--:|--:|--:|--:|")
for n, first, agg in rows:
    print(f"| {n} | {first:.0f} | {agg:.1f} | {agg / one_agg:.2f}x |")
