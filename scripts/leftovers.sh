#!/usr/bin/env bash
# What a test run must not leave behind: network namespaces, nftables tables, policy routes, processes.
#
#     bash scripts/leftovers.sh snapshot FILE   # before the run: the processes that were already there
#     bash scripts/leftovers.sh check FILE      # after: fails, listing them, if anything of the run is left
#
# Namespaces of the suite are named st<pid>x<n> (tests/support) and sb<pid>-* (bench/lib.sh); Strait's
# nftables tables are `inet strait*`; its policy routes look up table 0x5355 (TPROXY_TABLE). A process is
# the run's if it was not running at the snapshot, is not this script or one of its ancestors, and does
# not descend from another process that was (kernel threads excepted).
set -euo pipefail
cmd=${1:?snapshot or check}; file=${2:?state file}
procs() { ps -eo pid=,ppid=,args= | awk '$2 != 2 && $1 != 2 && $3 !~ /^\[/ {print $1}'; }
case $cmd in
snapshot) procs > "$file"; exit 0 ;;
check) ;;
*) echo "usage: $0 snapshot|check FILE" >&2; exit 2 ;;
esac
bad=0
ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^(st[0-9]+x[0-9]+|sb[0-9]+)' || true)
[ -z "$ns" ] || { echo "leftover network namespaces:"; echo "$ns"; bad=1; }
tables=$(nft list tables 2>/dev/null | grep -E 'strait' || true)
[ -z "$tables" ] || { echo "leftover nftables tables:"; echo "$tables"; bad=1; }
rules=$( { ip -4 rule; ip -6 rule; } 2>/dev/null | grep -Ei 'lookup (21333|0x5355)' || true)
[ -z "$rules" ] || { echo "leftover policy routes:"; echo "$rules"; bad=1; }
# Ancestors of this script (the suite's own shells, CI's runner) are not leftovers.
keep=" "; p=$$
while [ "$p" -gt 1 ] 2>/dev/null; do keep+="$p "; p=$(awk '{print $4}' /proc/$p/stat 2>/dev/null || echo 1); done
# A new process under something that was already running before the run and is not one of our ancestors
# (another login's shell, a monitoring agent) is not the run's. The run's leftovers are orphans (adopted by
# pid 1) or still hang under the run's own shells.
foreign() {
  local q; q=$(awk '{print $4}' /proc/$1/stat 2>/dev/null || echo 1)
  while [ "$q" -gt 1 ] 2>/dev/null; do
    if grep -qx "$q" "$file" && [[ $keep != *" $q "* ]]; then return 0; fi
    q=$(awk '{print $4}' /proc/$q/stat 2>/dev/null || echo 1)
  done
  return 1
}
new=()
for p in $(procs); do
  grep -qx "$p" "$file" && continue
  [[ $keep == *" $p "* ]] && continue
  [ -d /proc/$p ] || continue                       # gone meanwhile (ps, awk of this check)
  foreign "$p" && continue
  new+=("$p")
done
if [ ${#new[@]} -gt 0 ]; then
  left=$(ps -o pid=,ppid=,user=,args= -p "$(IFS=,; echo "${new[*]}")" 2>/dev/null || true)
  if [ -n "$left" ]; then echo "leftover processes:"; echo "$left"; bad=1; fi
fi
[ $bad -eq 0 ] && echo "no namespace, nftables table, policy route or process of the run is left"
exit $bad
