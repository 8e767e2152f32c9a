#!/usr/bin/env bash
# End-to-end benchmark of the VM-mode mesh, as root:
#
#     sudo bash bench/mesh-vm.sh [DURATION_SECONDS]
#
# Same run, same machine: wrk from host A to a docstore on host B,
#   direct - plaintext, before any proxy runs (the baseline);
#   mesh   - from a registered workload (uid 1001), captured by nftables on A, carried over mTLS (HTTP/2
#            CONNECT) to B's proxy, which parses HTTP and evaluates a compiled workflow policy per request.
# Each at 10 keep-alive connections and with a new connection per request; requests/s, p50/p99 latency,
# CPU microseconds per request in each proxy. Cleans up on exit.
DUR=${1:-10}
cd "$(dirname "$0")/.."
. bench/lib.sh

cat > $W/bench-workflow.yaml <<'WF'
apiVersion: strait.dev/v1
kind: Workflow
metadata: {name: bench}
trustDomain: bench.example
actors:
  - name: b
    services: [{name: client, namespace: b, serviceAccount: client}, {name: server, namespace: b, serviceAccount: server}]
steps:
  - {from: client, to: server, methods: [GET, POST], paths: ["/", "/api/**"]}
WF
$BIN policy compile -f $W/bench-workflow.yaml -o $W/bench.tar.gz >/dev/null

CSV=mesh-vm; rm -f bench/results/$CSV.csv
echo
table_header
wrk_run "direct, keep-alive, 10 conns" root no
wrk_run "direct, new connection per request" root yes
start_proxies $W/bench.tar.gz
rss() { awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/$1/status; }
echo "# proxy RSS idle: A $(rss $PA), B $(rss $PB)" >&2
wrk_run "mesh, keep-alive, 10 conns" 1001 no $PA $PB
wrk_run "mesh, new connection per request" 1001 yes $PA $PB
echo "# proxy RSS after load: A $(rss $PA), B $(rss $PB)" >&2
echo
plot mesh-vm mesh-vm-throughput "Throughput, direct vs mesh" "req/s" scenario req_per_s
plot mesh-vm mesh-vm-latency "Latency (p50, p99), direct vs mesh" ms scenario p50_ms p99_ms
