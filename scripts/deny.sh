#!/usr/bin/env bash
# Supply-chain checks of the workspace's dependencies with cargo-deny (deny.toml says what is allowed):
#
#     bash scripts/deny.sh
#
# licences (permissive only), bans (no second version of a crate unless deny.toml lists why, no OpenSSL or
# second TLS stack, no wildcard versions), sources (crates.io only), and RustSec advisories. The advisory
# database is a git repository on GitHub: where GitHub cannot be reached (this project's build machines
# reach only the package registries) that one check is reported as not run, loudly, and the others still
# decide; with `DENY_ADVISORIES=required` an unreachable database fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "installing cargo-deny $DENY_VERSION from crates.io (about 2 minutes)"
  cargo install cargo-deny --version "$DENY_VERSION" --locked --quiet \
    || die "could not install cargo-deny: cargo install cargo-deny --version $DENY_VERSION --locked"
fi

cargo deny --locked check licenses bans sources

if timeout 10 git ls-remote https://github.com/RustSec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny --locked check advisories
elif [ "${DENY_ADVISORIES:-}" = required ]; then
  die "RustSec's advisory database (github.com/RustSec/advisory-db) cannot be reached, and DENY_ADVISORIES=required"
else
  echo "warning: advisories NOT checked: github.com/RustSec/advisory-db cannot be reached from this machine" >&2
  echo "         (run bash scripts/deny.sh where it can; DENY_ADVISORIES=required makes this an error)" >&2
fi
