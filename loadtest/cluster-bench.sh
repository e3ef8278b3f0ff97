#!/usr/bin/env bash
# Fan-out on one node vs a local cluster, same harness, same run.
#   loadtest/cluster-bench.sh OUTDIR
# env: RATES=1000,2000 SECS=5 VIEWERS=1000 SENDERS=50 NODES=3 NATS=nats://127.0.0.1:4222
#      PROCS=1 SOURCE_IPS=1 ONLY="single cluster" EXTRA="…more loadtest flags"
# Needs a NATS server at $NATS. Room: `demo`; the nodes get viewers and senders round-robin
# (loadtest --url a,b,c); --server-pid sums the nodes' RSS and CPU.
set -euo pipefail
OUT=${1:?outdir}
RATES=${RATES:-1000,2000}; SECS=${SECS:-5}; VIEWERS=${VIEWERS:-1000}; SENDERS=${SENDERS:-50}
NODES=${NODES:-3}; NATS=${NATS:-nats://127.0.0.1:4222}; PROCS=${PROCS:-1}; SOURCE_IPS=${SOURCE_IPS:-1}
ONLY=${ONLY:-single cluster}; SECRET=sekret-loadtest; ADMIN=admintok; BASE=${BASE:-18300}
mkdir -p "$OUT"
cargo build --release -p giftcast -p loadtest >/dev/null

PIDS=(); DIRS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; for d in "${DIRS[@]}"; do rm -rf "$d"; done; PIDS=(); DIRS=(); }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

node() { # port [cluster args…]
  local port=$1; shift; local d; d=$(mktemp -d); DIRS+=("$d")
  target/release/giftcast --listen "127.0.0.1:$port" --data-dir "$d" --token-secret "$SECRET" --admin-token "$ADMIN" \
    --chat-rate 0 --gift-rate 0 --max-conns-per-ip 0 --log warn "$@" >"$OUT/node-$port.log" 2>&1 &
  PIDS+=($!)
}

run() { # name urls pids
  echo "== $1: $(nproc) cpus, load before: $(cut -d' ' -f1-3 /proc/loadavg), urls $2" | tee "$OUT/$1.txt"
  target/release/loadtest fanout --url "$2" --token-secret "$SECRET" --admin-token "$ADMIN" --streams demo --no-streamer \
    --viewers "$VIEWERS" --senders "$SENDERS" --rate "$RATES" --duration-secs "$SECS" --procs "$PROCS" --source-ips "$SOURCE_IPS" \
    --server-pid "$3" --no-progress --json "$OUT/$1.json" ${EXTRA:-} | tee -a "$OUT/$1.txt"
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$1.txt"
  for p in ${3//,/ }; do echo "pid $p VmHWM: $(grep VmHWM /proc/$p/status | tr -s ' \t' ' ')"; done | tee -a "$OUT/$1.txt"
}

for what in $ONLY; do
  case $what in
    single)
      node "$BASE"; wait_port "$BASE"
      run single "http://127.0.0.1:$BASE" "${PIDS[-1]}"; cleanup ;;
    cluster)
      CID="bench$$"; LIST=$(seq -s, -f 'n%g' 1 "$NODES"); URLS=(); NP=()
      for i in $(seq 1 "$NODES"); do
        node $((BASE + i)) --nats-url "$NATS" --cluster-id "$CID" --node-id "n$i" --nodes "$LIST"
        URLS+=("http://127.0.0.1:$((BASE + i))"); NP+=("${PIDS[-1]}")
      done
      for i in $(seq 1 "$NODES"); do wait_port $((BASE + i)); done
      sleep 1
      run "cluster$NODES" "$(IFS=,; echo "${URLS[*]}")" "$(IFS=,; echo "${NP[*]}")"; cleanup ;;
  esac
done
