#!/usr/bin/env bash
# Soak, as root (not in CI):
#
#     sudo bash bench/soak.sh [MINUTES] [RESTART_EVERY_S]     # default 30 minutes, a restart every 300 s
#     SOCKET_ACTIVATION=1 sudo bash bench/soak.sh 30 300       # A's proxy behind socket activation
#
# Continuous allowed traffic from host A to the docstore on B (hey, 4 connections × 25 req/s, keep-alive)
# through both proxies, while: SVIDs live 10 s (proxies renew at half life), a workflow change is applied
# every 10 s (the allowed step stays, another one comes and goes), and A's proxy is restarted (SIGTERM,
# then started again on its data directory) every RESTART_EVERY_S. Every 10 s the proxies' RSS and open
# descriptors are sampled. With SOCKET_ACTIVATION=1, A's proxy takes its outbound listeners from
# systemd-socket-activate (as from deploy/systemd/strait-proxy-outbound.socket) and a supervisor loop starts
# it again whenever it exits, so a restart should lose no connection at all. Prints failed requests (hey's non-2xx and errors), the samples' first and last
# rows, and writes bench/results/soak.csv and bench/results/soak-rss.svg (one group per minute).
MIN=${1:-30}
RESTART_EVERY=${2:-300}
DUR=$((MIN * 60))
cd "$(dirname "$0")/.."
command -v hey >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends hey >/dev/null || { echo "error: install hey" >&2; exit 1; }; }
CONTROL_ARGS="--svid-ttl 10s"
. bench/lib.sh

workflow 1 $W/b-1
cp $W/wf-1.yaml $W/wf-a.yaml
workflow 3 $W/b-3
cp $W/wf-3.yaml $W/wf-b.yaml
adm workflow apply -f $W/wf-a.yaml >/dev/null
start_proxies_distributed
if [ "${SOCKET_ACTIVATION:-0}" = 1 ]; then
  command -v systemd-socket-activate >/dev/null || { echo "error: SOCKET_ACTIVATION=1 needs systemd-socket-activate (apt-get install systemd)" >&2; exit 1; }
  kill -TERM $PA; while kill -0 $PA 2>/dev/null; do sleep 0.05; done
  # The supervisor holds the listeners for good and starts the proxy again whenever it exits, handing it
  # the same sockets (LISTEN_PID names each new process, as systemd does).
  cat > $W/supervise-a.sh <<EOS
while :; do
  sh -c 'export LISTEN_PID=\$\$; exec "\$@"' proxy $BIN proxy --control https://10.77.0.1:15012 --node host-a --data-dir $W/pa --address 10.77.0.2 --address fd77::2 --log-level info
  sleep 0.05
done
EOS
  # systemd-socket-activate runs its command at the first connection (as a socket unit would): the
  # subshell makes one; then it execs the loop (same pid), whose child is the proxy.
  bg pa-supervisor.log ip netns exec $P-a bash -c "(sleep 0.3; : </dev/tcp/127.0.0.1/15001) 2>/dev/null & exec systemd-socket-activate -l 127.0.0.1:15001 -l '[::1]:15001' --fdname=outbound:outbound -- bash $W/supervise-a.sh"
  SUP=${PIDS[-1]}
  # The proxy is the supervisor's child, not in PIDS: stop the loop first, then its proxy.
  trap 'kill -STOP $SUP 2>/dev/null; pkill -9 -P $SUP 2>/dev/null; kill -9 $SUP 2>/dev/null; cleanup' EXIT
  # By command line, not process name: STRAIT_BIN may be a copy under another name.
  proxy_a() { pgrep -P "$SUP" -f "$BIN proxy" || true; }
  deadline=$(( $(date +%s) + 60 ))
  until [ -n "$(proxy_a)" ] && ip netns exec $P-a curl -sf -o /dev/null http://127.0.0.1:15000/ready; do
    [ "$(date +%s)" -lt $deadline ] || die "the supervised proxy did not become ready in 60 s (log: $W/pa-supervisor.log)"
    sleep 0.05
  done
  PA=$(proxy_a)
  grep -q "handed over by the service manager" $W/pa-supervisor.log || { echo "error: the proxy did not take the activated sockets (log: $W/pa-supervisor.log)" >&2; exit 1; }
fi

chmod 755 $W; : > $W/hey.txt; chmod 666 $W/hey.txt   # written by the client's user
bg hey.log ip netns exec $P-a setpriv --reuid=1001 --regid=1001 --clear-groups sh -c "hey -z ${DUR}s -c 4 -q 25 -disable-compression $URL > $W/hey.txt 2>&1"
HEY=${PIDS[-1]}
csv_start soak t_s rss_a_mib rss_b_mib fds_a fds_b restarts
sample() { # PID → "rss_mib fds"
  awk '/VmRSS/ {printf "%.1f ", $2/1024}' /proc/$1/status 2>/dev/null || printf "0 "
  ls /proc/$1/fd 2>/dev/null | wc -l
}
start=$(date +%s); restarts=0; next_restart=$RESTART_EVERY; flip=0
while kill -0 $HEY 2>/dev/null; do
  sleep 10
  t=$(( $(date +%s) - start ))
  flip=$((1 - flip))
  adm workflow apply -f $W/wf-$([ $flip = 1 ] && echo b || echo a).yaml >/dev/null 2>&1 || echo "# warning: workflow apply failed at ${t}s" >&2
  if [ $t -ge $next_restart ] && [ $t -lt $((DUR - 20)) ]; then
    kill -TERM $PA; while kill -0 $PA 2>/dev/null; do sleep 0.05; done
    if [ "${SOCKET_ACTIVATION:-0}" = 1 ]; then
      deadline=$(( $(date +%s) + 60 ))
      until [ -n "$(proxy_a)" ] && [ "$(proxy_a)" != "$PA" ]; do   # the supervisor's next one
        [ "$(date +%s)" -lt $deadline ] || die "the supervisor started no new proxy in 60 s"
        sleep 0.05
      done
      PA=$(proxy_a)
    else
      bg pa-restart.log ip netns exec $P-a $BIN proxy --control https://10.77.0.1:15012 --node host-a --data-dir $W/pa --address 10.77.0.2 --address fd77::2 --log-level warn
      PA=${PIDS[-1]}
    fi
    until ip netns exec $P-a curl -sf -o /dev/null http://127.0.0.1:15000/ready; do sleep 0.05; done
    restarts=$((restarts + 1)); next_restart=$((next_restart + RESTART_EVERY))
  fi
  read -r ra fa <<<"$(sample $PA)"; read -r rb fb <<<"$(sample $PB)"
  csv_row soak "$t" "$ra" "$rb" "$fa" "$fb" "$restarts"
done
wait $HEY 2>/dev/null || true
total=$(awk '/Requests\/sec/ {print $2}' $W/hey.txt)
ok=$(awk '/\[200\]/ {print $2}' $W/hey.txt)
other=$(awk '/Status code distribution/ {f=1; next} f && /\[[0-9]+\]/ && $1 != "[200]" {n += $2} /Error distribution/ {f=0} END {print n+0}' $W/hey.txt)
errors=$(awk '/Error distribution/ {f=1; next} f && /\[[0-9]+\]/ {gsub(/[\[\]]/,"",$1); n += $1} END {print n+0}' $W/hey.txt)
echo
echo "soak: ${MIN} min, SVID lifetime 10 s, a workflow change every 10 s, $restarts restarts of A's proxy$([ "${SOCKET_ACTIVATION:-0}" = 1 ] && echo ' (socket activation)')"
echo "requests: ${ok:-0} answered 200, $other other statuses, $errors errors (hey: $total req/s)"
grep -E "Slowest|Average|99% in" $W/hey.txt | sed 's/^ */  /'
sed -n '/Error distribution/,$p' $W/hey.txt | head -12
echo "samples (first and last):"; head -2 bench/results/soak.csv; tail -1 bench/results/soak.csv
# One group per minute for the picture.
awk -F, 'NR == 1 || ($1 % 60) < 10' bench/results/soak.csv > bench/results/soak-minutes.csv
plot soak-minutes soak-rss "Proxy RSS during the soak (MiB)" MiB t_s rss_a_mib rss_b_mib
