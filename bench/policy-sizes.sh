#!/usr/bin/env bash
# Request latency through the mesh as the workflow grows, as root:
#
#     sudo bash bench/policy-sizes.sh [DURATION_SECONDS]
#
# One run, one topology: direct; the mesh with an allow-all policy; then compiled workflows of 10, 100,
# 1 000 and 10 000 steps (the client→server step plus generated steps between other services), swapped
# into the running proxies by hot reload. Keep-alive wrk at 10 connections.
DUR=${1:-8}
cd "$(dirname "$0")/.."
. bench/lib.sh

CSV=policy-sizes; rm -f bench/results/$CSV.csv
echo
table_header
wrk_run "direct, keep-alive" root no
start_proxies $W/live
wrk_run "mesh, allow-all policy" 1001 no $PA $PB
for n in 10 100 1000 10000; do
  workflow $n $W/b-$n
  swap $W/b-$n
  wrk_run "mesh, workflow of $n steps" 1001 no $PA $PB
done
echo
plot policy-sizes policy-sizes-throughput "Throughput, as the workflow grows" "req/s" scenario req_per_s
plot policy-sizes policy-sizes-latency "Latency (p50, p99), as the workflow grows" ms scenario p50_ms p99_ms
