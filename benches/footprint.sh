#!/usr/bin/env bash
# Footprint on one private redis-server: the API's submit requests/s (wrk,
# JSON jobs of one image URL, rate limits off), Redis memory per queued
# image (the images those submits left queued, no workers running), and
# the resident memory of the API and of an idle worker per stage.
#
# usage: benches/footprint.sh [seconds]      (default 10 s of load)
# IQ_BINARY picks the binary (default: a release build, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_OF_LOAD=${1:-10}
BIN=${IQ_BINARY:-target/release/image-queue}
if [ -z "${IQ_BINARY:-}" ]; then cargo build --release --bin image-queue >&2; fi
command -v wrk >/dev/null || { echo "install wrk (apt-get install wrk)" >&2; exit 1; }

DIR=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
API_PORT=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" --save "" --appendonly no --daemonize yes --logfile "$DIR/redis.log"
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done

export REDIS_URL="redis://127.0.0.1:$PORT/" IMAGE_QUEUE_DATA_DIR="$DIR/data" RUST_LOG=warn
export IMAGE_QUEUE_API__RATE_LIMITS__ENABLED=false
KEY=$($BIN vendors add bench)
$BIN api --listen "127.0.0.1:$API_PORT" >/dev/null 2>&1 &
pids+=($!)
API_PID=$!
until curl -fs "http://127.0.0.1:$API_PORT/readyz" >/dev/null; do sleep 0.1; done

mem() { redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r'; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
queued() { redis-cli -p "$PORT" xlen '{iq}:stream:rate-check' | tr -d '\r'; }

cat >"$DIR/submit.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.body = '{"operations":["resize"],"images":[{"url":"https://images.example.com/p/123456/front.jpg","record_id":"sku-123456"}]}'
EOF

before=$(mem)
wrk --latency -t2 -c16 -d"${SECONDS_OF_LOAD}s" -s "$DIR/submit.lua" "http://127.0.0.1:$API_PORT/api/image-queue/jobs" >"$DIR/wrk.txt"
after=$(mem)
n=$(queued)
api_rss=$(rss_kb "$API_PID")
rps=$(awk '/^Requests\/sec:/ { print $2 }' "$DIR/wrk.txt")
p50=$(awk '$1 == "50%" { print $2 }' "$DIR/wrk.txt")
p99=$(awk '$1 == "99%" { print $2 }' "$DIR/wrk.txt")
non2xx=$(awk '/Non-2xx/ { print $NF }' "$DIR/wrk.txt")

# Idle workers, one per stage, once they have connected and created their group.
workers=""
for stage in rate-check bg-removal face-crop resize upload db-commit; do
  $BIN worker --stage "$stage" >/dev/null 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do
    redis-cli -p "$PORT" hkeys '{iq}:workers' | grep -q -- "-$pid-" && break
    sleep 0.1
  done
  workers="$workers\"$stage\":$(rss_kb "$pid"),"
  kill "$pid"
done

printf '{"submit_requests_per_s":%s,"submit_p50":"%s","submit_p99":"%s","non_2xx":%s,"images_queued":%s,"redis_bytes_per_queued_image":%s,"api_rss_kb":%s,"idle_worker_rss_kb":{%s}}\n' \
  "$rps" "$p50" "$p99" "${non2xx:-0}" "$n" "$(( (after - before) / (n > 0 ? n : 1) ))" "$api_rss" "${workers%,}"
