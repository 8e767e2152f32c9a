#!/usr/bin/env bash
# The motivating study's latency experiment, reproduced (Miller et al. 2021, "Towards Secure and Leak-Free
# Workflows Using Microservice Isolation"), as root:
#
#     sudo bash bench/study.sh [SAMPLES]        # default 200 requests per scenario and placement
#
# Method as in the study: every request is a new connection, timed by `curl -w %{time_total}`, from the
# client workload (uid 1001 on host A) to the document store on host B, through both proxies. Scenarios:
# direct (no mesh), the mesh with an allow-all policy, the minimal workflow (one step), and the workflow with
# +100, +1 000 and +10 000 extra steps (between other services), swapped into the running proxies. Placements:
# intra (A and B on one bridge) and inter-region (tc netem adds 25 ms each way between A and B).
# Prints a table with the study's medians beside ours and writes bench/results/study.csv.
SAMPLES=${1:-200}
cd "$(dirname "$0")/.."
. bench/lib.sh
command -v tc >/dev/null || die "tc is missing: apt-get install iproute2"
# sample LABEL UID: SAMPLES new-connection POSTs; prints "median p90" in ms.
sample() {
  local uid=$1
  local cmd=(ip netns exec "$P-a")
  [ "$uid" = root ] || cmd+=(setpriv --reuid=$uid --regid=$uid --clear-groups)
  "${cmd[@]}" bash -c "for i in \$(seq $SAMPLES); do curl -s -o /dev/null -w '%{time_total}\n' -X POST --data-binary doc ${URL}api/server; done" \
    | sort -n | awk '{a[NR]=$1*1000} END {printf "%.2f %.2f", a[int((NR+1)/2)], a[int(NR*0.9)]}'
}
netem() { # on|off: 25 ms each way between A and the rest
  if [ "$1" = on ]; then
    ip netns exec $P-a tc qdisc add dev e0 root netem delay 25ms
    ip netns exec $P-sw tc qdisc add dev ${P}a root netem delay 25ms
  else
    ip netns exec $P-a tc qdisc del dev e0 root 2>/dev/null || true
    ip netns exec $P-sw tc qdisc del dev ${P}a root 2>/dev/null || true
  fi
}

declare -A STUDY_INTRA=([direct]=- [allow-all]="7.71 (all-allow OPA); 4.53 without OPA" [minimal]=7.88 [+100]=8.86 [+1000]=12.61 [+10000]=-)
declare -A STUDY_INTER=([direct]=- [allow-all]="54.58 (all-allow OPA); 51.41 without OPA" [minimal]=54.13 [+100]=54.97 [+1000]=60.26 [+10000]=-)
mkdir -p bench/results
CSV=bench/results/study.csv
echo "placement,scenario,samples,median_ms,p90_ms,study_median_ms" > $CSV
declare -A MED
run_mesh() { # PLACEMENT: the mesh scenarios, proxies running
  local pl=$1 n label
  swap $W/allow-all; MED[$pl,allow-all]=$(sample 1001)
  for n in 1 101 1001 10001; do
    case $n in 1) label=minimal;; *) label=+$((n-1));; esac
    swap $W/b-$n; MED[$pl,$label]=$(sample 1001)
  done
}

for n in 1 101 1001 10001; do workflow $n $W/b-$n; done
# tc netem needs the kernel's sch_netem; without it the inter-region placement is skipped, and said so.
HAVE_NETEM=yes
ip netns exec $P-a tc qdisc add dev lo root netem delay 1ms 2>/dev/null && ip netns exec $P-a tc qdisc del dev lo root \
  || { HAVE_NETEM=no; echo "# tc netem is not available in this kernel ($(uname -r)): the inter-region placement is skipped" >&2; }
# Direct first: once the proxies run, plaintext to the workload's port from another host is dropped.
MED[intra,direct]=$(sample root)
[ $HAVE_NETEM = yes ] && { netem on; MED[inter,direct]=$(sample root); netem off; }
start_proxies $W/live
run_mesh intra
if [ $HAVE_NETEM = yes ]; then netem on; run_mesh inter; netem off; fi

printf "\n%d new-connection requests per cell (curl time_total), client and server on two hosts, 2 cores shared by everything\n\n" "$SAMPLES"
printf "| scenario | intra median (p90) | overhead vs direct | study intra | inter median (p90) | study inter |\n|---|---|---|---|---|---|\n"
for s in direct allow-all minimal +100 +1000 +10000; do
  read -r im ip9 <<<"${MED[intra,$s]}"; read -r xm xp9 <<<"${MED[inter,$s]:-n/a n/a}"; read -r dm _ <<<"${MED[intra,direct]}"
  over=$(awk -v a="$im" -v b="$dm" 'BEGIN{printf "%+.2f ms", a-b}')
  printf "| %s | %s ms (%s) | %s | %s | %s ms (%s) | %s |\n" "$s" "$im" "$ip9" "$over" "${STUDY_INTRA[$s]}" "$xm" "$xp9" "${STUDY_INTER[$s]}"
  echo "intra,$s,$SAMPLES,$im,$ip9,${STUDY_INTRA[$s]%% *}" >> $CSV
  echo "inter,$s,$SAMPLES,$xm,$xp9,${STUDY_INTER[$s]%% *}" >> $CSV
done
echo; echo "wrote $CSV"
