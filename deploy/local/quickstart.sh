#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine, end to end:
#   set up .venv -> train a RoMA router patch on the bundled sample data -> start roma-serve
#   (tiny OLMoE on a vLLM-CPU engine + a local Redis) -> a completion -> deploy the patch with
#   curl -> the same completion under the new routers. The service then keeps running (Ctrl-C
#   stops it, its engine and its Redis).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/setup.sh
export HF_HUB_OFFLINE=1
export ROMA_ADMIN_TOKEN=${ROMA_ADMIN_TOKEN:-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')}
PORT=${ROMA_PORT:-8000}
URL="http://127.0.0.1:${PORT}"
mkdir -p runs/quickstart

echo "== 1. train a router patch (RoMA, k-NN neighbours) on trainer/data/sample.jsonl"
.venv/bin/roma-train train --data trainer/data/sample.jsonl --out runs/quickstart/patch.safetensors

echo "== 2. start roma-serve on ${URL} (engine start-up takes about a minute on 2 cores)"
.venv/bin/roma-serve --port "$PORT" > runs/quickstart/serve.log 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 300); do
  curl -sf "$URL/ready" > /dev/null && break
  kill -0 $SERVE_PID 2>/dev/null || { echo "roma-serve exited; see runs/quickstart/serve.log"; tail -20 runs/quickstart/serve.log; exit 1; }
  sleep 2
done
curl -sf "$URL/ready" > /dev/null || { echo "roma-serve not ready after 10 minutes"; exit 1; }

MODEL=$(curl -s "$URL/v1/models" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
complete() {
  curl -s -i "$URL/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"What is 5 plus 15? Answer:\", \"max_tokens\": 8, \"temperature\": 0}" \
    | grep -iE '^x-router-version|"text"' | sed 's/^/    /'
}
echo "== 3. a completion under the base routers (version 0)"
complete

echo "== 4. deploy the patch: POST /routers"
curl -s -X POST "$URL/routers" -H "Authorization: Bearer $ROMA_ADMIN_TOKEN" \
  -F patch=@runs/quickstart/patch.safetensors | sed 's/^/    /'
echo
echo "== 5. the same completion under the patch"
complete
echo "== roma-serve is running on $URL (admin token: $ROMA_ADMIN_TOKEN); Ctrl-C stops it."
wait $SERVE_PID
