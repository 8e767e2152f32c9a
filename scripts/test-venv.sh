#!/usr/bin/env bash
# The Python virtualenv of the end-to-end tests' third-party peers (grpcio, hypercorn, websockets), at
# target/test-venv: made once, remade when tests/apps/requirements.txt changes. Uses Debian's python3 so
# that the workloads' unprivileged users can run it (a pyenv under /root is not readable by them).
#
#     bash scripts/test-venv.sh        (scripts/test.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages python3 python3-venv
VENV=target/test-venv
REQ=tests/apps/requirements.txt
if [ -x "$VENV/bin/python" ] && cmp -s "$REQ" "$VENV/requirements.txt"; then
  exit 0
fi
step "test virtualenv ($VENV) from $REQ"
rm -rf "$VENV"
mkdir -p target
/usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" \
  || die "pip could not install $REQ (PyPI must be reachable)"
cp "$REQ" "$VENV/requirements.txt"
chmod -R a+rX "$VENV"
