#!/usr/bin/env bash
# The local mesh demo (the README's first command):
#
#     sudo bash scripts/demo.sh
#
# Installs what the demo needs (iproute2, nftables, tcpdump, curl, util-linux), builds Strait, and runs
# `strait demo`: a control plane and seven services of the reference film-production workflow, each behind
# its own node proxy, in network namespaces on this machine. It prints every request between the services
# with what the workflow expects and what happened, checks the packet capture for anything in clear, writes
# the workflow graph (SVG), and removes everything it created, also on Ctrl-C. Output goes to ./strait-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash scripts/demo.sh (the demo creates network namespaces and nftables tables)"
command -v cargo >/dev/null || die "cargo not found: install Rust 1.85 or newer (rustup) and run this again"
ensure_packages iproute2 nftables tcpdump curl ca-certificates util-linux

step "building strait (release)"
cargo build --release --locked --bin strait

step "strait demo"
exec target/release/strait demo --out-dir strait-demo "$@"
