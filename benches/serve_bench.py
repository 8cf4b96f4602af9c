"""Throughput of an OpenAI-compatible server under concurrent clients (issue: batched decoding).

    python3 benches/serve_bench.py URL [--model NAME] [CLIENTS...]

For each number of concurrent clients (default 1 2 4), every client sends the same greedy
chat request (128 new tokens; `--model base` by default, ragtune's closed-book mode without
an adapter) three times, not streamed; then once more streamed. Reports per client count:

- the aggregate decode tokens/s: all generated tokens (`usage.completion_tokens`) over the
  rounds' wall time, and its ratio to one client;
- the median first token, measured by the client on the streamed round (the time to the
  first chunk with text), so that any server can be compared; for ragtune also the
  server's own figure (the `ragtune.timings_ms.first_token` extension).

Works against `ragtune serve` and against llama-cpp-python's server (`python -m
llama_cpp.server --model FILE`), which ignores the ragtune extension. Start the server with
room for the largest client count (`ragtune serve --max-concurrent 4`); set `batch_decode =
false` in ragtune.toml to measure ragtune without batching.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request

parser = argparse.ArgumentParser()
parser.add_argument("url")
parser.add_argument("clients", nargs="*", type=int, default=[1, 2, 4])
parser.add_argument("--model", default="base")
parser.add_argument("--max-tokens", type=int, default=128)
args = parser.parse_intermixed_args()
base = args.url.rstrip("/")


def body(stream):
    return json.dumps(
        {
            "model": args.model,
            "messages": [
                {"role": "user", "content": "Write a long essay about open source licenses."}
            ],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()


def request(stream):
    return urllib.request.Request(
        base + "/v1/chat/completions", body(stream), {"Content-Type": "application/json"}
    )


def one():
    """A non-streamed answer: (completion tokens, server first-token ms or None)."""
    with urllib.request.urlopen(request(False)) as r:
        answer = json.load(r)
    server_first = answer.get("ragtune", {}).get("timings_ms", {}).get("first_token")
    return answer["usage"]["completion_tokens"], server_first


def first_chunk_ms():
    """A streamed answer: ms from sending to the first chunk with text."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(request(True)) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0].get("delta", {})
            if delta.get("content"):
                return (time.perf_counter() - t0) * 1e3
    return (time.perf_counter() - t0) * 1e3


def concurrently(n, f):
    results = []
    threads = [threading.Thread(target=lambda: results.append(f())) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


one()  # warm-up
rows = []
for n in args.clients:
    walls, tokens, server_firsts = [], 0, []
    for _ in range(3):
        results, wall = concurrently(n, one)
        walls.append(wall)
        tokens += sum(t for t, _ in results)
        server_firsts += [f for _, f in results if f is not None]
    firsts, _ = concurrently(n, first_chunk_ms)
    rows.append(
        (
            n,
            statistics.median(firsts),
            statistics.median(server_firsts) if server_firsts else None,
            tokens / sum(walls),
        )
    )
one_agg = rows[0][3]
print("| clients | first token ms (client, median) | server's first token ms | aggregate tokens/s | vs 1 client |")
print("|--:|--:|--:|--:|--:|")
for n, first, server_first, agg in rows:
    server = f"{server_first:.0f}" if server_first is not None else "–"
    print(f"| {n} | {first:.0f} | {server} | {agg:.1f} | {agg / one_agg:.2f}x |")
