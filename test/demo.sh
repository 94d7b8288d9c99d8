#!/usr/bin/env bash
# nsflow demo: two pods, traffic between them and between two "containers"
# of one pod over its loopback, traced by nsflow. Needs root.
# Everything it creates is removed on exit, also on failure or Ctrl-C.
set -euo pipefail
BIN=${1:-bin/nsflow}
WEB=demo-web DB=demo-db

cleanup() {
	[ -n "${TRACE_PID:-}" ] && kill "$TRACE_PID" 2>/dev/null || true
	"$BIN" pod delete "$WEB" "$DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$BIN" pod create "$WEB"
"$BIN" pod create "$DB"
db_ip=$(ip -n "$DB" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')

echo "--- tracing $WEB and $DB for 6s"
"$BIN" trace --netns "$WEB" --netns "$DB" --duration 6s --top 10 &
TRACE_PID=$!
sleep 1 # let the trace attach

# Pod to pod: ping and a 1-second TCP stream (iperf3) over the bridge.
"$BIN" pod exec "$WEB" -- ping -c 5 -i 0.2 "$db_ip" >/dev/null
"$BIN" pod exec "$DB" -- iperf3 --server --one-off --port 5201 >/dev/null &
sleep 0.3
"$BIN" pod exec "$WEB" -- iperf3 --client "$db_ip" --port 5201 --time 1 >/dev/null

# Two containers of the web pod talking over lo: invisible on the veth.
"$BIN" pod exec "$WEB" -- iperf3 --server --one-off --port 5202 >/dev/null &
sleep 0.3
"$BIN" pod exec "$WEB" -- iperf3 --client 127.0.0.1 --port 5202 --time 1 --bitrate 100M >/dev/null

wait "$TRACE_PID"
TRACE_PID=
