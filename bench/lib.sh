# Shared by the end-to-end benchmarks: a control plane and hosts A and B in network namespaces on a
# bridge, a docstore workload on B (uid 1002), registered client uid 1001 on A. Source it; it cleans up
# on exit.
set -euo pipefail
die() { echo "error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash $0"
for c in wrk nft ip curl setpriv; do
  command -v $c >/dev/null || { apt-get install -y -qq wrk nftables iproute2 curl util-linux >/dev/null || die "install $c"; break; }
done
# STRAIT_BIN: a copy of the binary to measure, so a long run is not disturbed by a rebuild of target/.
if [ -n "${STRAIT_BIN:-}" ]; then
  BIN=$STRAIT_BIN
  [ -x "$BIN" ] || die "STRAIT_BIN=$BIN is not an executable"
else
  cargo build --release -q
  BIN=$PWD/target/release/strait
fi
P=sb$$
W=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for n in sw cp a b; do ip netns del $P-$n 2>/dev/null || true; done
  rm -rf "$W"
}
# INT/TERM end the script (a trap alone would let it run on); EXIT then cleans up.
trap cleanup EXIT
trap 'exit 130' INT TERM

for n in sw cp a b; do ip netns add $P-$n; ip -n $P-$n link set lo up; done
ip -n $P-sw link add br0 type bridge && ip -n $P-sw link set br0 up
i=1
for n in cp a b; do
  ip link add $P$n type veth peer name e0 netns $P-$n
  ip link set $P$n netns $P-sw && ip -n $P-sw link set $P$n master br0 up
  ip -n $P-$n addr add 10.77.0.$i/24 dev e0 && ip -n $P-$n addr add fd77::$i/64 dev e0 nodad
  ip -n $P-$n link set e0 up
  i=$((i+1))
done

# Results: every script writes its table as bench/results/NAME.csv and plots it as SVG (`strait bench plot`).
mkdir -p bench/results
csv_start() { local f=bench/results/$1.csv; shift; (IFS=,; echo "$*") > "$f"; }
csv_row() { local f=bench/results/$1.csv; shift; (IFS=,; echo "$*") >> "$f"; }
# plot NAME OUT TITLE UNIT CATEGORY_COLUMN VALUE_COLUMN...
plot() {
  local name=$1 out=$2 title=$3 unit=$4 cat=$5 vals=(); shift 5
  for v in "$@"; do vals+=(--value "$v"); done
  $BIN bench plot bench/results/$name.csv --category "$cat" "${vals[@]}" --title "$title" --unit "$unit" -o bench/results/$out.svg >/dev/null
  echo "wrote bench/results/$name.csv and bench/results/$out.svg"
}
# to_ms 850us|1.20ms|1.5s → milliseconds (wrk's and h2load's units).
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }
# Rows of wrk_run/h2_run also go to bench/results/$CSV.csv when CSV is set.
CSV=
result_row() { # LABEL RPS P50 P99 CPU_A CPU_B
  [ -n "$CSV" ] || return 0
  [ -f bench/results/$CSV.csv ] || csv_start $CSV scenario req_per_s p50_ms p99_ms cpu_us_per_req_a cpu_us_per_req_b
  csv_row $CSV "${1//,/;}" "$2" "$(to_ms "$3")" "$(to_ms "$4")" "$5" "$6"
}

bg() { local log=$1; shift; "$@" >"$W/$log" 2>&1 & PIDS+=($!); disown; }
$BIN control init --data-dir $W/cp --trust-domain bench.example --server 10.77.0.1:15012 >/dev/null
bg cp.log ip netns exec $P-cp $BIN control --data-dir $W/cp --listen 10.77.0.1:15012 ${CONTROL_ARGS:-}
sleep 0.5
adm() { ip netns exec $P-cp env STRAIT_CONFIG=$W/cp/admin.yaml $BIN "$@"; }
adm workload add --id spiffe://bench.example/ns/b/sa/client --node host-a --uid 1001 --port 5000/http >/dev/null
adm workload add --id spiffe://bench.example/ns/b/sa/server --node host-b --uid 1002 --port 5000/http --port 7001/grpc >/dev/null
bg docstore.log ip netns exec $P-b setpriv --reuid=1002 --regid=1002 --clear-groups $BIN docstore --listen '[::]:5000' --name server
sleep 0.5
URL=http://10.77.0.3:5000/

# start_proxies BUNDLE: starts the proxies on A and B with the bundle, waits until both are ready and
# know each other. Sets PA and PB.
start_proxies() {
  local TA TB
  TA=$(adm node token create --node host-a 2>/dev/null); TB=$(adm node token create --node host-b 2>/dev/null)
  bg pa.log ip netns exec $P-a $BIN proxy --control https://10.77.0.1:15012 --node host-a --token "$TA" --data-dir $W/pa --address 10.77.0.2 --address fd77::2 --log-level warn --policy-bundle "$1"
  PA=${PIDS[-1]}
  bg pb.log ip netns exec $P-b $BIN proxy --control https://10.77.0.1:15012 --node host-b --token "$TB" --data-dir $W/pb --address 10.77.0.3 --address fd77::3 --log-level warn --policy-bundle "$1"
  PB=${PIDS[-1]}
  for n in a b; do
    for _ in $(seq 100); do ip netns exec $P-$n curl -sf http://127.0.0.1:15000/ready >/dev/null && break; sleep 0.1; done
  done
  # The directory is pushed: wait until each proxy knows the other node.
  for _ in $(seq 100); do
    ip netns exec $P-a curl -s http://127.0.0.1:15000/config_dump | grep -q '"host-b"' \
      && ip netns exec $P-b curl -s http://127.0.0.1:15000/config_dump | grep -q '"host-a"' && break
    sleep 0.1
  done
}

# wrk_run LABEL UID CLOSE(yes|no) [PROXY_PID_A PROXY_PID_B]: one table row.
wrk_run() {
  local label=$1 uid=$2 close=$3 pa=${4:-} pb=${5:-}
  local hdr=()
  [ "$close" = yes ] && hdr=(-H "Connection: close")
  local cpu0a=0 cpu0b=0
  [ -n "$pa" ] && cpu0a=$(awk '{print $14+$15}' /proc/$pa/stat) && cpu0b=$(awk '{print $14+$15}' /proc/$pb/stat)
  local out
  if [ "$uid" = root ]; then
    out=$(ip netns exec $P-a wrk -t2 -c10 -d${DUR}s --latency "${hdr[@]}" $URL)
  else
    out=$(ip netns exec $P-a setpriv --reuid=$uid --regid=$uid --clear-groups wrk -t2 -c10 -d${DUR}s --latency "${hdr[@]}" $URL)
  fi
  local rps p50 p99 reqs non2xx
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
  [ -z "$non2xx" ] || echo "# warning: $label had $non2xx non-2xx answers" >&2
  local cpua=- cpub=-
  if [ -n "$pa" ]; then
    local tck; tck=$(getconf CLK_TCK)
    cpua=$(awk -v a="$(awk '{print $14+$15}' /proc/$pa/stat)" -v b=$cpu0a -v n=$reqs -v t=$tck 'BEGIN{printf "%.1f", (a-b)/t*1e6/n}')
    cpub=$(awk -v a="$(awk '{print $14+$15}' /proc/$pb/stat)" -v b=$cpu0b -v n=$reqs -v t=$tck 'BEGIN{printf "%.1f", (a-b)/t*1e6/n}')
  fi
  printf "| %-40s | %10s | %8s | %8s | %12s | %12s |\n" "$label" "$rps" "$p50" "$p99" "$cpua" "$cpub"
  result_row "$label" "$rps" "$p50" "$p99" "$cpua" "$cpub"
}

table_header() {
  printf "| %-40s | %10s | %8s | %8s | %12s | %12s |\n" scenario "req/s" p50 p99 "µs CPU/req A" "µs CPU/req B"
  printf "|%s|%s|%s|%s|%s|%s|\n" "$(printf -- '-%.0s' {1..42})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})"
}

# Policies for the scenarios: an allow-all bundle, workflows of N steps, hot swaps into running proxies.
mkdir -p $W/allow-all
printf 'package envoy.authz\nimport rego.v1\nallow := true\n' > $W/allow-all/policy.rego
printf '{"revision": "a11a11"}\n' > $W/allow-all/.manifest
cp -r $W/allow-all $W/live
# A directory bundle is watched by content; replace its files atomically to swap policies.
swap() { # BUNDLE_DIR: replaces the live bundle and waits until both proxies report its revision
  rm -rf $W/next && cp -r "$1" $W/next && rm -rf $W/old && mv $W/live $W/old && mv $W/next $W/live
  local want h; want=$(sed -n 's/.*"revision": *"\([0-9a-f]*\)".*/\1/p' $W/live/.manifest)
  for h in a b; do
    for _ in $(seq 150); do
      ip netns exec $P-$h curl -s http://127.0.0.1:15000/config_dump | grep -q "\"policy_revision\": \"$want\"" && break
      sleep 0.1
    done
    ip netns exec $P-$h curl -s http://127.0.0.1:15000/config_dump | grep -q "\"policy_revision\": \"$want\"" \
      || die "proxy on $h did not load revision $want"
  done
}
workflow() { # N OUT_DIR
  local n=$1 k=101 f t
  {
    echo "apiVersion: strait.dev/v1"; echo "kind: Workflow"; echo "metadata: {name: bench}"; echo "trustDomain: bench.example"
    echo "actors:"; echo "  - name: b"; echo "    services:"
    echo "      - {name: client, namespace: b, serviceAccount: client}"
    echo "      - {name: server, namespace: b, serviceAccount: server}"
    for i in $(seq 0 $((k-1))); do echo "      - {name: s$i, namespace: gen, serviceAccount: s$i}"; done
    echo "steps:"
    echo "  - {from: client, to: server, methods: [GET, POST], paths: [\"/\", \"/api/**\", \"/strait.test.Echo/*\"]}"
    for i in $(seq 1 $((n-1))); do
      f=$((i % k)); t=$(((i / k + 1 + i % k) % k))
      echo "  - {from: s$f, to: s$t, methods: [POST], paths: [\"/api/s$t\"]}"
    done
  } > $W/wf-$n.yaml
  $BIN policy compile -f $W/wf-$n.yaml -o $W/wf-$n.tar.gz >/dev/null
  rm -rf "$2" && mkdir -p "$2" && tar xzf $W/wf-$n.tar.gz -C "$2"
}


# start_proxies_distributed: proxies on A and B that take their policy from the control plane (no local
# bundle); waits until both are ready and the client reaches the server. Sets PA and PB.
start_proxies_distributed() {
  local TA TB n
  TA=$(adm node token create --node host-a 2>/dev/null); TB=$(adm node token create --node host-b 2>/dev/null)
  bg pa.log ip netns exec $P-a $BIN proxy --control https://10.77.0.1:15012 --node host-a --token "$TA" --data-dir $W/pa --address 10.77.0.2 --address fd77::2 --log-level warn
  PA=${PIDS[-1]}
  bg pb.log ip netns exec $P-b $BIN proxy --control https://10.77.0.1:15012 --node host-b --token "$TB" --data-dir $W/pb --address 10.77.0.3 --address fd77::3 --log-level warn
  PB=${PIDS[-1]}
  for n in a b; do until ip netns exec $P-$n curl -sf -o /dev/null http://127.0.0.1:15000/ready; do sleep 0.05; done; done
  until ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups curl -s -o /dev/null -w '%{http_code}' http://10.77.0.3:5000/ | grep -q 200; do sleep 0.05; done
}
