#!/usr/bin/env bash
# The whole Strait test suite, exactly as CI runs it (`.ci/run` calls this file):
#
#     sudo bash scripts/test.sh
#
# Installs the Debian packages the tests use, then checks formatting, runs clippy with warnings as
# errors, and runs every test of the workspace against one shared release build. End-to-end tests
# create network namespaces and nftables tables, which needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash scripts/test.sh (the suite installs Debian packages and creates network namespaces and nftables tables)"
command -v cargo >/dev/null || die "cargo not found: install Rust 1.85 or newer (rustup) and run this again"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"

# Debian packages the tests drive: openssl (independent certificate checks and TLS clients), nftables
# and iproute2 (capture and namespaces), curl (a real HTTP client), tcpdump (what crosses the wire),
# util-linux (setpriv: workloads as other users), socat (half-closes and raw requests), nghttp2-client
# (nghttp: an HTTP/2 client that shows trailers), systemd (systemd-socket-activate stands in for the
# proxy's socket units in the restart test; installing it starts no service here), hey (the load
# generator `strait bench gateway` drives). scripts/check-package.sh adds adduser and binutils, and
# installs cargo-deb.
ensure_packages openssl nftables iproute2 curl ca-certificates tcpdump util-linux socat nghttp2-client g++ dnsmasq-base bind9-dnsutils systemd hey

# What runs now is not the suite's: everything started after this must be gone at the end.
LEFTOVERS=$(mktemp)
bash scripts/leftovers.sh snapshot "$LEFTOVERS"

# grpcio, hypercorn and websockets for the L7 tests (tests/mesh_l7.rs), in target/test-venv.
bash scripts/test-venv.sh

# regorus runs ~3.5x slower and serialises threads when backtraces are captured (see NOTES.md).
export RUST_LIB_BACKTRACE=0

step "cargo fmt --check"
cargo fmt --all --check || die "code is not formatted: run cargo fmt --all"

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "dependencies: licences, duplicates, sources, advisories (cargo deny, deny.toml)"
bash scripts/deny.sh

step "cargo test (release)"
cargo test --workspace --release --locked

step "Debian package and systemd units (cargo-deb, dpkg -i/-r/--purge, systemd-analyze)"
bash scripts/check-package.sh

step "deployment manifests and Containerfile (kubectl kustomize, kubernetes-validate, checkov, hadolint)"
bash scripts/check-deploy.sh

# A few seconds of every fuzz target (fuzz/, cargo-fuzz): a debug build with AddressSanitizer, quicker to
# build than a campaign's optimised one. Campaigns: bash scripts/fuzz.sh 600 (docs/fuzzing.md).
step "fuzz targets (${FUZZ_SECONDS:-8} s each)"
FUZZ_BUILD=--dev bash scripts/fuzz.sh "${FUZZ_SECONDS:-8}"

step "nothing of the suite is left (namespaces, nftables tables, policy routes, processes)"
bash scripts/leftovers.sh check "$LEFTOVERS"
rm -f "$LEFTOVERS"
