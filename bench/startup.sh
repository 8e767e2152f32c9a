#!/usr/bin/env bash
# Start-up costs, as root:
#
#     sudo bash bench/startup.sh [RUNS]         # default 10 runs per row
#
# 1. Process start → /ready 200 for the proxy on host B (join with a one-time token, workload SVID, the mesh
#    version from the distributor, nftables), with no workflow, the minimal workflow and a 10 001-step
#    workflow in the control plane; then a restart that reuses the node identity and persisted version.
# 2. Registering a new workload (already running, already in the workflow) → its first allowed request.
# The study (Miller et al. 2021) measured +1.9 s (about +33 %) of pod start-up for adding the OPA sidecar.
RUNS=${1:-10}
cd "$(dirname "$0")/.."
. bench/lib.sh

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# start_b DATA_DIR [TOKEN]: starts the proxy on B, prints ms to /ready, stops it (SIGTERM, drained).
start_b() {
  local data=$1 token=${2:-} t0 t1 args=()
  [ -n "$token" ] && args=(--token "$token")
  t0=$(now_ms)
  ip netns exec $P-b $BIN proxy --control https://10.77.0.1:15012 --node host-b "${args[@]}" --data-dir "$data" \
    --address 10.77.0.3 --address fd77::3 --log-level warn >>$W/startup-b.log 2>&1 &
  local pid=$!
  until ip netns exec $P-b curl -sf -o /dev/null http://127.0.0.1:15000/ready; do sleep 0.005; done
  t1=$(now_ms)
  kill -TERM $pid; wait $pid 2>/dev/null || true
  echo $((t1 - t0))
}

row() { # LABEL: RUNS fresh starts (new join each) and RUNS restarts
  local label=$1 fresh=() again=() i tok
  for i in $(seq $RUNS); do
    rm -rf $W/pb-s
    tok=$(adm node token create --node host-b 2>/dev/null)
    fresh+=("$(start_b $W/pb-s "$tok")")
  done
  for i in $(seq $RUNS); do again+=("$(start_b $W/pb-s)"); done
  local f a; f=$(printf '%s\n' "${fresh[@]}" | median); a=$(printf '%s\n' "${again[@]}" | median)
  printf "| %-34s | %8s ms | %8s ms |\n" "$label" "$f" "$a"
  csv_row startup "${label//,/;}" "$f" "$a"
}

workflow 1 $W/b-1
workflow 10001 $W/b-10001
printf "\nproxy start → /ready (median of %d)\n\n| %-34s | %11s | %11s |\n|---|---|---|\n" "$RUNS" "workflows in the control plane" "first start" "restart"
csv_start startup workflows first_start_ms restart_ms
row "none (the mesh denies everything)"
adm workflow apply -f $W/wf-1.yaml --wait 20s >/dev/null
row "minimal workflow (1 step)"
adm workflow apply -f $W/wf-10001.yaml --wait 60s >/dev/null
row "workflow of 10 001 steps"

# Registration → first allowed request: a second service on B (uid 1004, port 5001) that the workflow
# already names, running before it is registered.
cat > $W/wf-reg.yaml <<YAML
apiVersion: strait.dev/v1
kind: Workflow
metadata: {name: bench}
trustDomain: bench.example
actors:
  - name: b
    services:
      - {name: client, namespace: b, serviceAccount: client}
      - {name: server, namespace: b, serviceAccount: server}
      - {name: server2, namespace: b, serviceAccount: server2}
steps:
  - {from: client, to: server, methods: [GET, POST], paths: ["/", "/api/**"]}
  - {from: client, to: server2, methods: [POST], paths: ["/api/server2"]}
YAML
adm workflow apply -f $W/wf-reg.yaml --wait 60s >/dev/null
bg docstore2.log ip netns exec $P-b setpriv --reuid=1004 --regid=1004 --clear-groups $BIN docstore --listen '[::]:5001' --name server2
TA=$(adm node token create --node host-a 2>/dev/null); TB=$(adm node token create --node host-b 2>/dev/null)
rm -rf $W/pa $W/pb
bg pa.log ip netns exec $P-a $BIN proxy --control https://10.77.0.1:15012 --node host-a --token "$TA" --data-dir $W/pa --address 10.77.0.2 --address fd77::2 --log-level warn
bg pb.log ip netns exec $P-b $BIN proxy --control https://10.77.0.1:15012 --node host-b --token "$TB" --data-dir $W/pb --address 10.77.0.3 --address fd77::3 --log-level warn
for n in a b; do until ip netns exec $P-$n curl -sf -o /dev/null http://127.0.0.1:15000/ready; do sleep 0.05; done; done
until ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups curl -s -o /dev/null -w '%{http_code}' -X POST -d x http://10.77.0.3:5000/api/server | grep -q 201; do sleep 0.05; done
t0=$(now_ms)
adm workload add --id spiffe://bench.example/ns/b/sa/server2 --node host-b --uid 1004 --port 5001/http >/dev/null
until ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups curl -s -o /dev/null -w '%{http_code}' --max-time 2 -X POST -d x http://10.77.0.3:5001/api/server2 | grep -q 201; do sleep 0.005; done
t1=$(now_ms)
printf "\nregistering a running workload → its first allowed request: %d ms (includes the CLI call: TLS + the store's fsync)\n" $((t1 - t0))
csv_start startup-registration event ms
csv_row startup-registration "register a running workload → first allowed request" $((t1 - t0))
plot startup startup "Proxy start → /ready (median of $RUNS)" ms workflows first_start_ms restart_ms
