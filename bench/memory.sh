#!/usr/bin/env bash
# Proxy memory, as root:
#
#     sudo bash bench/memory.sh [CONNECTIONS]      # default 1000
#
# RSS of the proxies on A (source) and B (destination) idle, then while CONNECTIONS keep-alive connections
# from the client workload on A to the docstore on B are open and busy (wrk), then after.
CONNS=${1:-1000}
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
. bench/lib.sh
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$1/status; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$1/status; }

workflow 1 $W/b-1
adm workflow apply -f $W/wf-1.yaml >/dev/null
start_proxies_distributed
sleep 1
IA=$(rss $PA); IB=$(rss $PB)
ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups wrk -t2 -c$CONNS -d12s $URL > $W/wrk.txt 2>&1 &
WRK=$!
sleep 6
OPEN=$(ip netns exec $P-a curl -s http://127.0.0.1:15000/metrics | awk '/^strait_proxy_active_connections.*outbound/ {s+=$2} END {print s+0}')
LA=$(rss $PA); LB=$(rss $PB)
wait $WRK || true
sleep 2
AA=$(rss $PA); AB=$(rss $PB)
printf "\n| proxy | idle | with %d connections open (%s counted by proxy A) | after | peak |\n|---|---|---|---|---|\n" "$CONNS" "$OPEN"
printf "| A (source) | %s MiB | %s MiB | %s MiB | %s MiB |\n" "$IA" "$LA" "$AA" "$(hwm $PA)"
printf "| B (destination) | %s MiB | %s MiB | %s MiB | %s MiB |\n" "$IB" "$LB" "$AB" "$(hwm $PB)"
csv_start memory proxy idle_mib loaded_mib after_mib peak_mib
csv_row memory "A (source)" "$IA" "$LA" "$AA" "$(hwm $PA)"
csv_row memory "B (destination)" "$IB" "$LB" "$AB" "$(hwm $PB)"
echo; grep -E "Requests/sec|requests in|Socket errors" $W/wrk.txt
plot memory memory "Proxy RSS, idle and with $CONNS open connections" MiB proxy idle_mib loaded_mib after_mib peak_mib
