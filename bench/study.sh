#!/usr/bin/env bash
# The motivating study's latency experiment (Miller et al. 2021, "Towards Secure and Leak-Free Workflows
# Using Microservice Isolation"), reproduced on the demo's seven-service topology, as root:
#
#     sudo bash bench/study.sh [SAMPLES]        # default 40 requests per permitted step (the study's 40+)
#     sudo bash bench/study.sh 40 --federated   # the study's deployment: five organisations, their gateways
#
# Runs `strait bench study` (see `strait bench study --help` for the method): every permitted step of the
# film-production workflow, a new connection per request timed by curl, direct and through the mesh with
# allow-all, the workflow, +100, +1 000, +10 000 extra steps; then the steps that cross a 25 ms WAN between two
# regions (tc netem where the kernel has sch_netem, else `strait bench wan-relay`). Writes
# bench/results/study/{study.csv,study-pairs.csv,study-samples.csv,study-*.svg} (with --federated:
# bench/results/study-federated/). Arguments after SAMPLES go to `strait bench study` as they are.
set -euo pipefail
SAMPLES=${1:-40}
shift || true
OUT=bench/results/study
for a in "$@"; do [ "$a" = --federated ] && OUT=bench/results/study-federated; done
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "error: run as root: sudo bash $0" >&2; exit 1; }
for c in nft ip curl setpriv tcpdump; do
  command -v $c >/dev/null || { apt-get install -y -qq nftables iproute2 curl util-linux tcpdump >/dev/null || { echo "error: install $c" >&2; exit 1; }; break; }
done
cargo build --release -q
exec ./target/release/strait bench study --samples "$SAMPLES" --out-dir "$OUT" "$@"
