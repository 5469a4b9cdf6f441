#!/usr/bin/env bash
# Pipeline overhead, side by side on one private redis-server:
# image-queue's pipeline, the same workload on BullMQ, and the raw Redis
# ceiling for the commands one stage hop needs. Rounds are interleaved
# (A, B, A, B, ...) and medians reported, because the machine is shared.
#
# usage: benches/pipeline.sh [jobs] [rounds]     (default 20000 jobs, 3 rounds)
# IQ_BINARY picks the binary (default: a release build, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-20000}
ROUNDS=${2:-3}
BIN=${IQ_BINARY:-target/release/image-queue}
if [ -z "${IQ_BINARY:-}" ]; then cargo build --release --bin image-queue >&2; fi
(cd benches/bullmq && { [ -d node_modules ] || npm ci --silent --no-audit --no-fund; }) >&2

DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" --save "" --appendonly no --daemonize yes --logfile "$DIR/redis.log"
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done
URL="redis://127.0.0.1:$PORT/"

ours=() ; bull=() ; ours_paced=() ; bull_paced=()
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  ours+=("$(RUST_LOG=warn $BIN bench pipeline --redis-url "$URL" --jobs "$JOBS")")
  bull+=("$(node benches/bullmq/bench.mjs "$URL" "$JOBS")")
  ours_paced+=("$(RUST_LOG=warn $BIN bench pipeline --redis-url "$URL" --jobs 5000 --rate 500)")
  bull_paced+=("$(node benches/bullmq/bench.mjs "$URL" 5000 500)")
done

# The raw ceiling: pipelined XADD, XREADGROUP-sized reads are served from
# memory, so one hop is bounded by XADD + XACK + HSET; six hops a job.
redis-cli -p "$PORT" XGROUP CREATE ceil g '$' MKSTREAM >/dev/null
PAYLOAD=$(python3 -c 'print("x"*420)')
# `redis-benchmark -q` ends with "<command>: <n> requests per second, ...".
rps() { tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -n1 | cut -d' ' -f1; }
xadd=$(redis-benchmark -p "$PORT" -n 200000 -P 64 -q XADD ceil '*' e "$PAYLOAD" | rps)
hset=$(redis-benchmark -p "$PORT" -n 200000 -P 64 -q HSET job:__rand_int__ 0:stage resize 0:status processing | rps)
xack=$(redis-benchmark -p "$PORT" -n 200000 -P 64 -q XACK ceil g 0-1 | rps)

python3 - "$JOBS" "$xadd" "$hset" "$xack" <<'PY' "${ours[@]}" "--" "${bull[@]}" "--" "${ours_paced[@]}" "--" "${bull_paced[@]}"
import json, statistics, sys
jobs, xadd, hset, xack = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
groups, cur = [], []
for a in sys.argv[5:]:
    if a == "--":
        groups.append(cur); cur = []
    else:
        cur.append(json.loads(a))
groups.append(cur)
ours, bull, ours_p, bull_p = groups
def med(rs, k): return statistics.median(r[k] for r in rs)
hop_s = 1 / (1 / xadd + 1 / hset + 1 / xack)
ceiling = hop_s / 6
print(f"{'':28}{'jobs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'Redis µs/job':>14}")
for name, rs in [("image-queue (saturated)", ours), ("BullMQ (saturated)", bull),
                 ("image-queue (500 jobs/s)", ours_p), ("BullMQ (500 jobs/s)", bull_p)]:
    print(f"{name:28}{med(rs,'jobs_per_s'):>10.0f}{med(rs,'p50_ms'):>9.1f}{med(rs,'p99_ms'):>9.1f}{med(rs,'redis_cpu_us_per_job'):>14.1f}")
print(f"{'raw Redis ceiling':28}{ceiling:>10.0f}   (XADD {xadd:.0f}/s, HSET {hset:.0f}/s, XACK {xack:.0f}/s pipelined; 6 hops a job)")
print()
print(f"image-queue / BullMQ jobs/s: {med(ours,'jobs_per_s') / med(bull,'jobs_per_s'):.1f}x")
print(f"image-queue / ceiling:       {100 * med(ours,'jobs_per_s') / ceiling:.0f}%")
print(f"BullMQ / image-queue Redis CPU per job: {med(bull,'redis_cpu_us_per_job') / med(ours,'redis_cpu_us_per_job'):.1f}x")
print(f"medians of {len(ours)} interleaved rounds, {jobs} jobs each (paced runs: 5000 jobs)")
PY
