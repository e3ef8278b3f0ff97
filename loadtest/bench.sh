#!/usr/bin/env bash
# Side-by-side fan-out benchmark: giftcast vs the Node `ws` and Bun peer hubs, same harness,
# same load steps. Everything on loopback; each hub runs alone while it is measured.
#
#   loadtest/bench.sh [OUT_DIR]        env: RATES=1000,2000,4000 VIEWERS=1000 SENDERS=50 SECS=5
#                                           HUBS="giftcast node bun" GIFTCAST=target/release/giftcast
#                                           PIN=1: hub on CPU 1, harness on CPU 0 (same for every hub)
#                                           NICE=-10: run hub and harness at this nice level (root)
#
# Writes OUT_DIR/<hub>.json, .svg and .txt (default OUT_DIR: target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/bench}
RATES=${RATES:-1000,2000,4000}
VIEWERS=${VIEWERS:-1000}
SENDERS=${SENDERS:-50}
SECS=${SECS:-5}
SECRET=bench-secret-key
PORT_GC=${PORT_GC:-18281}
PORT_NODE=${PORT_NODE:-18282}
PORT_BUN=${PORT_BUN:-18283}
HUBS=${HUBS:-giftcast node bun}
GIFTCAST=${GIFTCAST:-target/release/giftcast}
HUB_PFX=(); LT_PFX=()
if [ -n "${NICE:-}" ]; then HUB_PFX+=(nice -n "$NICE"); LT_PFX+=(nice -n "$NICE"); fi
if [ "${PIN:-0}" = 1 ]; then HUB_PFX+=(taskset -c 1); LT_PFX+=(taskset -c 0); fi
mkdir -p "$OUT"
cargo build --release -p giftcast -p loadtest >/dev/null
( cd loadtest/peers/node && [ -d node_modules ] || npm ci --no-audit --no-fund >/dev/null )
( cd loadtest/peers/bun && [ -d node_modules ] || npm ci --no-audit --no-fund >/dev/null )

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

run() { # name port pid
  echo "== $1: $(nproc) cpus, load before: $(cut -d' ' -f1-3 /proc/loadavg)${PIN:+, pinned}${NICE:+, nice $NICE}" | tee "$OUT/$1.txt"
  "${LT_PFX[@]}" target/release/loadtest fanout --url "http://127.0.0.1:$2" --token-secret "$SECRET" --no-streamer \
    --viewers "$VIEWERS" --senders "$SENDERS" --rate "$RATES" --duration-secs "$SECS" \
    --server-pid "$3" --no-progress --json "$OUT/$1.json" --svg "$OUT/$1.svg" | tee -a "$OUT/$1.txt"
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$1.txt"
}

for h in $HUBS; do
  case $h in
    giftcast)
      DATA=$(mktemp -d)
      "${HUB_PFX[@]}" "$GIFTCAST" --listen "127.0.0.1:$PORT_GC" --data-dir "$DATA" --token-secret "$SECRET" \
        --chat-rate 0 --gift-rate 0 --max-conns-per-ip 0 --log warn &
      PIDS+=($!); wait_port "$PORT_GC"; run giftcast "$PORT_GC" "${PIDS[-1]}"; kill "${PIDS[-1]}"; wait "${PIDS[-1]}" || true; rm -rf "$DATA" ;;
    node)
      "${HUB_PFX[@]}" node loadtest/peers/node/hub.js --port "$PORT_NODE" --token-secret "$SECRET" >/dev/null &
      PIDS+=($!); wait_port "$PORT_NODE"; run node "$PORT_NODE" "${PIDS[-1]}"; kill "${PIDS[-1]}" ;;
    bun)
      "${HUB_PFX[@]}" loadtest/peers/bun/node_modules/.bin/bun loadtest/peers/bun/hub.ts --port "$PORT_BUN" --token-secret "$SECRET" >/dev/null &
      PIDS+=($!); wait_port "$PORT_BUN"; run bun "$PORT_BUN" "${PIDS[-1]}"; kill "${PIDS[-1]}" ;;
  esac
done

echo; echo "== summary ($VIEWERS viewers, $SENDERS senders, steps $RATES msgs/s, ${SECS}s each)"
for h in $HUBS; do echo "-- $h"; grep -E "^== |^  step|^server|^client|^delivery ratio|^load after" "$OUT/$h.txt"; done
