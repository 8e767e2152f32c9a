#!/usr/bin/env bash
# The local mesh demo: `sudo bash scripts/demo.sh`.
#
# `strait demo` (control plane, proxies and the reference workflow in network namespaces) is built by a later
# issue. Until it exists this script says so instead of pretending.
set -euo pipefail
cat >&2 <<'MSG'
strait demo is not available yet: the control plane, the node proxy and the demo are still being built.
What works today is the certificate authority; see "A five-minute tour of the CA" in README.md.
MSG
exit 2
