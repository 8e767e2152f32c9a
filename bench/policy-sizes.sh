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

mkdir -p $W/allow-all
printf 'package envoy.authz\nimport rego.v1\nallow := true\n' > $W/allow-all/policy.rego
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
    echo "  - {from: client, to: server, methods: [GET, POST], paths: [\"/\", \"/api/**\"]}"
    for i in $(seq 1 $((n-1))); do
      f=$((i % k)); t=$(((i / k + 1 + i % k) % k))
      echo "  - {from: s$f, to: s$t, methods: [POST], paths: [\"/api/s$t\"]}"
    done
  } > $W/wf-$n.yaml
  $BIN policy compile -f $W/wf-$n.yaml -o $W/wf-$n.tar.gz >/dev/null
  rm -rf "$2" && mkdir -p "$2" && tar xzf $W/wf-$n.tar.gz -C "$2"
}

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
