#!/usr/bin/env bash
# Throughput and tail latency in one run, as root:
#
#     sudo bash bench/compare.sh [SECONDS]      # default 8 s per row
#
# From host A to the docstore on host B: direct; through Strait (both proxies, mTLS tunnel, the minimal
# workflow decided per request); and through a pair of Debian nginx doing the same hop (plain HTTP into an
# egress nginx on A, mutual TLS 1.3 to an ingress nginx on B, plain HTTP to the docstore; upstream keep-alive
# on both). HTTP/1.1 keep-alive with wrk (10 connections) and HTTP/2 with h2load (10 connections × 10
# streams; h2c to the first hop); a fixed 1 000 req/s with hey (10 connections × 100 req/s: latency and the
# cores each proxy uses at that load); gRPC unary calls one at a time with h2load against a grpcio server
# (tests/apps/grpc_server.py; median of the per-call times h2load logs).
DUR=${1:-8}
cd "$(dirname "$0")/.."
for c in nginx h2load hey; do
  command -v $c >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light nghttp2-client hey >/dev/null || { echo "error: install nginx-light, nghttp2-client and hey" >&2; exit 1; }; break; }
done
bash scripts/test-venv.sh   # grpcio for the gRPC row
. bench/lib.sh

# Certificates for the nginx pair (a throwaway CA; DNS names, which nginx verifies).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca -keyout $W/ca.key -out $W/ca.pem 2>/dev/null
for n in egress ingress; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$n.bench -keyout $W/$n.key -out $W/$n.csr 2>/dev/null
  printf "subjectAltName=DNS:%s.bench\nextendedKeyUsage=serverAuth,clientAuth\n" $n > $W/$n.ext
  openssl x509 -req -in $W/$n.csr -CA $W/ca.pem -CAkey $W/ca.key -CAcreateserial -days 1 -extfile $W/$n.ext -out $W/$n.pem 2>/dev/null
done
cat > $W/egress.conf <<CONF
worker_processes 1; daemon off; pid $W/egress.pid; error_log $W/egress.err warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
  upstream b { server 10.77.0.3:8443; keepalive 64; }
  server {
    listen 127.0.0.1:8001; listen 127.0.0.1:8002 http2;
    location / {
      proxy_pass https://b; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate $W/egress.pem; proxy_ssl_certificate_key $W/egress.key;
      proxy_ssl_trusted_certificate $W/ca.pem; proxy_ssl_verify on; proxy_ssl_name ingress.bench;
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;
    }
  }
}
CONF
cat > $W/ingress.conf <<CONF
worker_processes 1; daemon off; pid $W/ingress.pid; error_log $W/ingress.err warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
  upstream app { server 127.0.0.1:5000; keepalive 64; }
  server {
    listen 10.77.0.3:8443 ssl;
    ssl_certificate $W/ingress.pem; ssl_certificate_key $W/ingress.key; ssl_protocols TLSv1.3;
    ssl_client_certificate $W/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
bg egress.log ip netns exec $P-a nginx -c $W/egress.conf
bg ingress.log ip netns exec $P-b nginx -c $W/ingress.conf
sleep 1
# The workers do the work (CPU per request is read from them).
NA=$(pgrep -P "$(cat $W/egress.pid)" | head -1); NB=$(pgrep -P "$(cat $W/ingress.pid)" | head -1)
# The cleanup SIGKILLs what it started; nginx workers outlive a killed master, so they are listed too.
PIDS+=("$NA" "$NB")

# h2_run LABEL UID URL [PID_A PID_B]
h2_run() {
  local label=$1 uid=$2 url=$3 cmd=(ip netns exec $P-a)
  [ "$uid" = root ] || cmd+=(setpriv --reuid=$uid --regid=$uid --clear-groups)
  local out; out=$("${cmd[@]}" h2load -c10 -m10 -D $DUR "$url" 2>&1)
  local rps p50 p99
  rps=$(echo "$out" | awk '/^finished in/ {gsub(",","",$4); print $4}')
  # h2load prints request time min/max/mean/sd; report mean and max in place of percentiles.
  p50=$(echo "$out" | awk '/^time for request:/ {print $6}')
  p99=$(echo "$out" | awk '/^time for request:/ {print $5}')
  local ok; ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
  printf "| %-40s | %10s | %8s | %8s | %12s | %12s |\n" "$label (h2load; mean, max)" "$rps" "$p50" "$p99" "2xx: $ok" "-"
  result_row "$label (h2load; mean and max)" "$rps" "$p50" "$p99" - -
}

# hey_run LABEL UID PID_A PID_B: a fixed 1 000 req/s (10 connections × 100 req/s): p50, p99, and the
# cores each proxy uses (CPU seconds ÷ wall seconds).
hey_run() {
  local label=$1 uid=$2 pa=${3:-} pb=${4:-} cmd=(ip netns exec $P-a)
  [ "$uid" = root ] || cmd+=(setpriv --reuid=$uid --regid=$uid --clear-groups)
  local tck c0a=0 c0b=0 t0 t1; tck=$(getconf CLK_TCK)
  [ -n "$pa" ] && c0a=$(awk '{print $14+$15}' /proc/$pa/stat) && c0b=$(awk '{print $14+$15}' /proc/$pb/stat)
  t0=$(date +%s.%N)
  local out; out=$("${cmd[@]}" hey -z ${DUR}s -c 10 -q 100 "$URL" 2>&1)
  t1=$(date +%s.%N)
  local p50 p99 ca=- cb=-
  p50=$(echo "$out" | awk '/ 50% in/ {printf "%.2fms", $3*1000}')
  p99=$(echo "$out" | awk '/ 99% in/ {printf "%.2fms", $3*1000}')
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  if [ -n "$pa" ]; then
    ca=$(awk -v a="$(awk '{print $14+$15}' /proc/$pa/stat)" -v b=$c0a -v t=$tck -v s="$t0" -v e="$t1" 'BEGIN{printf "%.3f core", (a-b)/t/(e-s)}')
    cb=$(awk -v a="$(awk '{print $14+$15}' /proc/$pb/stat)" -v b=$c0b -v t=$tck -v s="$t0" -v e="$t1" 'BEGIN{printf "%.3f core", (a-b)/t/(e-s)}')
  fi
  printf "| %-40s | %10s | %8s | %8s | %12s | %12s |\n" "$label" "$rps" "$p50" "$p99" "$ca" "$cb"
  result_row "$label" "$rps" "$p50" "$p99" "${ca% core}" "${cb% core}"
}

# grpc_run LABEL UID: N unary calls one after another (h2load -c1 -m1, h2c) to the grpcio server; the
# median and p99 of the per-call times h2load logs.
grpc_run() {
  local label=$1 uid=$2 n=2000 cmd=(ip netns exec $P-a)
  [ "$uid" = root ] || cmd+=(setpriv --reuid=$uid --regid=$uid --clear-groups)
  local calls=$W/grpc-calls.log
  rm -f $calls && touch $calls && chmod 666 $calls   # written by the client's user
  "${cmd[@]}" h2load -n $n -c 1 -m 1 -d $W/grpc.req --log-file=$calls \
    -H 'content-type: application/grpc' -H 'te: trailers' http://10.77.0.3:7001/strait.test.Echo/Unary >$W/h2load-grpc.txt 2>&1 \
    || { echo "# warning: $label: h2load failed: $(tail -3 $W/h2load-grpc.txt)" >&2; }
  local ok p50 p99
  ok=$(awk '$2 == 200' $calls | wc -l)
  p50=$(awk '{print $3}' $calls | sort -n | awk '{a[NR]=$1} END {printf "%.3fms", a[int(NR*0.5)]/1000}')
  p99=$(awk '{print $3}' $calls | sort -n | awk '{a[NR]=$1} END {printf "%.3fms", a[int(NR*0.99)]/1000}')
  printf "| %-40s | %10s | %8s | %8s | %12s | %12s |\n" "$label" "$ok of $n" "$p50" "$p99" "-" "-"
  result_row "$label" "-" "$p50" "$p99" - -
}
printf '\x00\x00\x00\x00\x05hello' > $W/grpc.req
chmod 644 $W/grpc.req; chmod 755 $W
bg grpc.log ip netns exec $P-b setpriv --reuid=1002 --regid=1002 --clear-groups $PWD/target/test-venv/bin/python $PWD/tests/apps/grpc_server.py 7001
sleep 1

workflow 1 $W/b-1
adm workflow apply -f $W/wf-1.yaml >/dev/null
CSV=compare; rm -f bench/results/$CSV.csv
echo
table_header
wrk_run "direct, HTTP/1.1 keep-alive" root no
h2_run "direct, HTTP/2" root http://10.77.0.3:5000/
hey_run "direct, fixed 1 000 req/s (hey)" root
grpc_run "direct, gRPC unary (h2load, one at a time)" root
URL=http://127.0.0.1:8001/
wrk_run "nginx mTLS pair, HTTP/1.1 keep-alive" root no $NA $NB
hey_run "nginx mTLS pair, fixed 1 000 req/s (hey)" root $NA $NB
h2_run "nginx mTLS pair, HTTP/2 to egress" root http://127.0.0.1:8002/
URL=http://10.77.0.3:5000/
# Strait with the distributed minimal workflow (no --policy-bundle).
start_proxies_distributed
wrk_run "Strait (Rego per request), HTTP/1.1" 1001 no $PA $PB
h2_run "Strait (Rego per request), HTTP/2" 1001 $URL
hey_run "Strait (Rego per request), fixed 1 000 req/s" 1001 $PA $PB
grpc_run "Strait (Rego per call), gRPC unary" 1001
echo
plot compare compare-throughput "Throughput: direct, nginx mTLS pair, Strait" "req/s" scenario req_per_s
plot compare compare-latency "Latency (wrk: p50/p99; h2load: mean/max)" ms scenario p50_ms p99_ms
