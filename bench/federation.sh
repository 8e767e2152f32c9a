#!/usr/bin/env bash
# Cross-organisation requests against same-organisation ones, in one run, as root:
#
#     sudo bash bench/federation.sh [SECONDS]      # default 8 s per row
#
# Two organisations: bench.example (its control plane on "cp", proxies on A and B, the client on A and a
# docstore on B) and partner.example (its own control plane, CA and one node C with a docstore), federated
# both ways; partner.example exports its docstore to bench.example and both organisations' workflows have
# the step client → partner docstore. wrk from the client on A: to B (same organisation) and to C (across),
# keep-alive and a new connection per request, with the CPU each proxy spent per request (A and the
# destination's). Then the cost of a federation refresh (bundle and exports) on the control plane.
DUR=${1:-8}
cd "$(dirname "$0")/.."
. bench/lib.sh

# Host C of the partner, on the same bridge.
ip netns add $P-c && ip -n $P-c link set lo up
ip link add ${P}c type veth peer name e0 netns $P-c
ip link set ${P}c netns $P-sw && ip -n $P-sw link set ${P}c master br0 up
ip -n $P-c addr add 10.77.0.4/24 dev e0 && ip -n $P-c addr add fd77::4/64 dev e0 nodad && ip -n $P-c link set e0 up
trap 'cleanup; ip netns del $P-c 2>/dev/null || true' EXIT

$BIN control init --data-dir $W/pcp --trust-domain partner.example --server 10.77.0.4:15012 >/dev/null
bg pcp.log ip netns exec $P-c $BIN control --data-dir $W/pcp --listen 10.77.0.4:15012 --monitoring off
padm() { ip netns exec $P-c env STRAIT_CONFIG=$W/pcp/admin.yaml $BIN "$@"; }
for _ in $(seq 100); do padm federation bundle >/dev/null 2>&1 && break; sleep 0.1; done
RENDER=spiffe://partner.example/ns/film/sa/render
CLIENT=spiffe://bench.example/ns/b/sa/client
padm workload add --id $RENDER --node host-c --uid 1002 --port 5000/http >/dev/null
bg pdocstore.log ip netns exec $P-c setpriv --reuid=1002 --regid=1002 --clear-groups $BIN docstore --listen '[::]:5000' --name render

# Federation both ways: each side adds the other with the bundle and fingerprint the other printed.
adm federation bundle > $W/bench.json 2> $W/bench.fp
padm federation bundle > $W/partner.json 2> $W/partner.fp
adm federation add --trust-domain partner.example --endpoint 10.77.0.4:15012 --bootstrap-bundle $W/partner.json \
  --fingerprint "$(sed -n 's/^fingerprint: //p' $W/partner.fp)" >/dev/null
padm federation add --trust-domain bench.example --endpoint 10.77.0.1:15012 --bootstrap-bundle $W/bench.json \
  --fingerprint "$(sed -n 's/^fingerprint: //p' $W/bench.fp)" >/dev/null

# The same step shape on both sides of the federation, and the same-organisation step beside it.
cat > $W/wf.yaml <<YAML
apiVersion: strait.dev/v1
kind: Workflow
metadata: {name: bench}
trustDomain: bench.example
actors:
  - name: b
    services:
      - {name: client, namespace: b, serviceAccount: client}
      - {name: server, namespace: b, serviceAccount: server}
  - name: partner
    services: [{name: render, id: "$RENDER"}]
steps:
  - {from: client, to: server, methods: [GET, POST], paths: ["/", "/api/**"]}
  - {from: client, to: render, methods: [GET, POST], paths: ["/", "/api/**"]}
YAML
cat > $W/pwf.yaml <<YAML
apiVersion: strait.dev/v1
kind: Workflow
metadata: {name: bench}
trustDomain: partner.example
actors:
  - name: bench
    services: [{name: client, id: "$CLIENT"}]
  - name: partner
    services: [{name: render, namespace: film, serviceAccount: render}]
steps:
  - {from: client, to: render, methods: [GET, POST], paths: ["/", "/api/**"]}
YAML
adm workflow apply -f $W/wf.yaml >/dev/null
padm workflow apply -f $W/pwf.yaml >/dev/null
start_proxies_distributed
TC=$(padm node token create --node host-c 2>/dev/null)
bg pc.log ip netns exec $P-c $BIN proxy --control https://10.77.0.4:15012 --node host-c --token "$TC" --data-dir $W/pc --address 10.77.0.4 --address fd77::4 --log-level warn
PC=${PIDS[-1]}
for _ in $(seq 100); do ip netns exec $P-c curl -sf -o /dev/null http://127.0.0.1:15000/ready && break; sleep 0.1; done
padm federation export --trust-domain bench.example --workload $RENDER >/dev/null
adm federation refresh --trust-domain partner.example >/dev/null
CROSS=http://10.77.0.4:5000/
for _ in $(seq 100); do
  [ "$(ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups curl -s -o /dev/null -w '%{http_code}' $CROSS)" = 200 ] && break
  sleep 0.1
done
[ "$(ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups curl -s -o /dev/null -w '%{http_code}' $CROSS)" = 200 ] \
  || die "the cross-organisation request does not pass: $(tail -5 $W/pa.log $W/pc.log)"

CSV=federation
rm -f bench/results/federation.csv
echo
echo "B = the destination's proxy: host B (same organisation) or host C (the partner's)"
table_header
SAME=$URL
wrk_run "same organisation, keep-alive" 1001 no $PA $PB
URL=$CROSS
wrk_run "cross-organisation, keep-alive" 1001 no $PA $PC
URL=$SAME
wrk_run "same organisation, new connection each" 1001 yes $PA $PB
URL=$CROSS
wrk_run "cross-organisation, new connection each" 1001 yes $PA $PC
URL=$SAME

# The control plane's cost of one refresh of the partner (bundle endpoint fetch and exports fetch, both
# over mTLS to the partner's control plane, then the store update).
CP=${PIDS[0]}   # the first process lib.sh started: this organisation's control plane
N=50
c0=$(awk '{print $14+$15}' /proc/$CP/stat)
t0=$(date +%s%N)
for _ in $(seq $N); do adm federation refresh --trust-domain partner.example >/dev/null; done
t1=$(date +%s%N)
c1=$(awk '{print $14+$15}' /proc/$CP/stat)
echo
printf "| federation refresh (bundle + exports), %d in a row | %.1f ms wall each (CLI included) | %.2f ms control-plane CPU each |\n" \
  $N "$(awk -v a=$t0 -v b=$t1 -v n=$N 'BEGIN{print (b-a)/1e6/n}')" \
  "$(awk -v a=$c0 -v b=$c1 -v n=$N -v t="$(getconf CLK_TCK)" 'BEGIN{print (b-a)/t*1000/n}')"
plot federation federation "Same- vs cross-organisation requests" "req/s" scenario req_per_s
