#!/usr/bin/env bash
# Fairness: vendor A submits a backlog, then vendor B one image. B's latency
# alone and behind A's backlog, with the sized admission window, a fixed one
# and on a plain FIFO, on one private redis-server; rounds repeated and
# medians reported, because the machine is shared.
#
# usage: benches/fairness.sh [rounds] [image-queue bench fairness flags...]
#        (default 3 rounds; flags e.g. --backlog 2000 --work-ms 25 --window 32, or --real)
# IQ_BINARY picks the binary (default: a release build, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
shift || true
BIN=${IQ_BINARY:-target/release/image-queue}
if [ -z "${IQ_BINARY:-}" ]; then cargo build --release --bin image-queue >&2; fi

DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" --save "" --appendonly no --daemonize yes --logfile "$DIR/redis.log"
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done

runs=()
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  runs+=("$(RUST_LOG=warn $BIN bench fairness --redis-url "redis://127.0.0.1:$PORT/" "$@")")
done

python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
def med(mode, k):
    vals = [r[mode][k] for r in runs if r[mode] and r[mode][k] is not None]
    return statistics.median(vals) if vals else float("nan")
def med_of(k):
    vals = [r[k] for r in runs if r[k] is not None]
    return statistics.median(vals) if vals else float("nan")
r0 = runs[0]
print(f"vendor A's backlog: {r0['backlog']} images; resize: {r0['work']}, concurrency {r0['concurrency']}")
print(f"{'':30}{'window':>8}{'B alone ms':>12}{'B behind A ms':>15}{'ratio':>8}{'A img/s':>9}{'A done':>8}")
for mode, name in [("sized", "sized window (default)"), ("fixed", "fixed window"), ("fifo", "plain FIFO")]:
    if r0[mode] is None:
        continue
    print(f"{name:30}{med(mode,'window'):>8.0f}{med(mode,'alone_ms'):>12.0f}{med(mode,'behind_ms'):>15.0f}{med(mode,'ratio'):>7.1f}x{med(mode,'a_images_per_s'):>9.1f}{med(mode,'backlog_done'):>8.0f}")
print(f"FIFO / sized, B behind the backlog: {med_of('fifo_over_sized'):.0f}x")
print(f"A's throughput, sized / fixed window: {med_of('sized_over_fixed_throughput'):.2f}")
if r0["sized"]:
    print(f"sized window's reason (round 1): {r0['sized']['window_reason']}")
print(f"medians of {len(runs)} rounds")
PY
