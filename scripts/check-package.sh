#!/usr/bin/env bash
# The Debian package and its systemd units, checked the way VM users get them (as root; scripts/test.sh
# runs it after the Rust tests):
#
#     sudo bash scripts/check-package.sh
#
# Builds the .deb with cargo-deb from the release build, installs it with dpkg -i, checks files, modes and
# the `strait` user, verifies the installed units (systemd-analyze verify; security exposure ≤ 2.5 each),
# then removes and purges it and checks that nothing is left (files, user, nftables table).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash scripts/check-package.sh (it installs and purges a Debian package)"
CARGO_DEB_VERSION=3.8.0
MAX_EXPOSURE=2.5
ensure_packages systemd adduser nftables binutils

if dpkg-query -W -f='${Status}' strait 2>/dev/null | grep -q 'install ok installed'; then
  die "a strait package is already installed here; this check installs and purges its own: remove it first (dpkg --purge strait)"
fi
getent passwd strait >/dev/null && die "a user named strait already exists; this check creates and removes it: delete it first (deluser --system strait)"

if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  step "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked -q
fi

fail() { echo "FAIL: $*" >&2; dpkg --purge strait >/dev/null 2>&1 || true; exit 1; }
check() { local what=$1; shift; if "$@"; then echo "ok: $what"; else fail "$what"; fi; }

step "building the package"
cargo build --release --locked -q
DEB=$(cargo deb --no-build --strip --locked 2>/dev/null | tail -1)
[ -f "$DEB" ] || die "cargo deb did not produce a package (run cargo deb --no-build to see why)"
echo "$DEB ($(du -h "$DEB" | cut -f1))"

step "unit files before installation: exposure ≤ $MAX_EXPOSURE"
for u in strait-control strait-proxy strait-gateway; do
  score=$(systemd-analyze security --offline=true "deploy/systemd/$u.service" 2>/dev/null | awk '/Overall exposure level/ {print $(NF-2)}')
  echo "$u: $score"
  awk -v s="$score" -v m=$MAX_EXPOSURE 'BEGIN { exit !(s != "" && s + 0 <= m) }' || fail "$u exposure $score > $MAX_EXPOSURE"
done

step "dpkg -i"
dpkg -i "$DEB" >/dev/null
check "package installed" dpkg-query -W strait
check "binary runs" /usr/bin/strait --version
check "binary mode 755 root" test "$(stat -c '%a %U' /usr/bin/strait)" = "755 root"
for u in strait-control.service strait-proxy.service strait-proxy-outbound.socket strait-proxy-tunnel.socket strait-gateway.service; do
  check "$u installed 644" test "$(stat -c '%a' /lib/systemd/system/$u)" = 644
done
for f in control.env proxy.env gateway.env; do
  check "/etc/strait/$f is 0600 root:root" test "$(stat -c '%a %U %G' /etc/strait/$f)" = "600 root root"
done
check "conffiles registered" sh -c 'dpkg-query --showformat="\${Conffiles}" -W strait | grep -q /etc/strait/proxy.env'
check "system user strait exists" getent passwd strait
check "strait is a system user (uid < 1000)" test "$(id -u strait)" -lt 1000
check "strait cannot log in" sh -c 'getent passwd strait | cut -d: -f7 | grep -Eq "nologin|false"'
check "group strait exists" getent group strait
check "documentation installed" test -f /usr/share/doc/strait/install-vm.md

step "systemd-analyze verify (installed units)"
out=$(systemd-analyze verify /lib/systemd/system/strait-control.service /lib/systemd/system/strait-proxy.service \
  /lib/systemd/system/strait-proxy-outbound.socket /lib/systemd/system/strait-proxy-tunnel.socket \
  /lib/systemd/system/strait-gateway.service 2>&1) \
  || fail "systemd-analyze verify: $out"
# Warnings about this machine's other units are not ours; ours must be silent.
if echo "$out" | grep -q 'strait-'; then fail "systemd-analyze verify complained: $out"; fi
echo "ok: systemd-analyze verify"

step "dpkg -r (configuration kept), then --purge (nothing left)"
nft add table inet strait   # as a crashed proxy would have left it
dpkg -r strait >/dev/null
check "binary removed" test ! -e /usr/bin/strait
check "units removed" test ! -e /lib/systemd/system/strait-proxy.service
check "socket units removed" test ! -e /lib/systemd/system/strait-proxy-outbound.socket
check "configuration kept on remove" test -f /etc/strait/proxy.env
check "nftables table removed on remove" sh -c '! nft list table inet strait >/dev/null 2>&1'
dpkg --purge strait >/dev/null
check "package purged" sh -c '! dpkg-query -W -f="\${Status}" strait 2>/dev/null | grep -q installed'
check "configuration purged" test ! -e /etc/strait
check "state purged" test ! -e /var/lib/strait
check "user removed" sh -c '! getent passwd strait'
check "group removed" sh -c '! getent group strait'
echo; echo "package check passed"
