#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer) for SECONDS each, as the test suite does with a
# few seconds and an operator's campaign with many minutes:
#
#     bash scripts/fuzz.sh [SECONDS] [TARGET...]      # default 10 s, every target
#     bash scripts/fuzz.sh 3600 http_request           # an hour on one target
#
# Seeds are in fuzz/seeds/TARGET (committed); what the fuzzer learns goes to target/fuzz-corpus/TARGET
# (kept between runs, so later campaigns start where earlier ones stopped). A crash stops the run with
# the input saved under fuzz/artifacts/TARGET and the command that replays it; turn it into a regression
# seed (fuzz/seeds/TARGET) once it is fixed. The toolchain here is stable: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass libFuzzer's -Z flags to it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-10}
shift || true
die() { echo "error: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) and run this again"
command -v c++ >/dev/null || die "a C++ compiler is needed to build libFuzzer: apt-get install g++"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked --quiet || die "could not install cargo-fuzz: cargo install cargo-fuzz"
fi
export RUSTC_BOOTSTRAP=1
# Memory safety is Rust's; the sanitizer that matters for the few unsafe blocks is AddressSanitizer.
# FUZZ_BUILD="--dev" builds faster (the test suite's smoke run); campaigns use the optimised default.
BUILD=(${FUZZ_BUILD:--O})
echo "==> building fuzz targets (${BUILD[*]})"
(cd fuzz && cargo fuzz build "${BUILD[@]}" 2>&1 | grep -Ev '^\s+(Compiling|Downloaded|Downloading)' || true)
mapfile -t ALL < <(cd fuzz && cargo fuzz list)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
printf "| %-16s | %8s | %10s | %8s | %s\n" target seconds executions corpus result
for t in "${TARGETS[@]}"; do
  corpus=target/fuzz-corpus/$t
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  log=target/fuzz-$t.log
  set +e
  (cd fuzz && cargo fuzz run "${BUILD[@]}" "$t" "../$corpus" "seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  runs=$(awk '/stat::number_of_executed_units/ {print $NF}' "$log" | tail -1)
  size=$(ls "$corpus" | wc -l)
  if [ $rc -ne 0 ]; then
    printf "| %-16s | %8s | %10s | %8s | %s\n" "$t" "$SECONDS_EACH" "${runs:-?}" "$size" "FAILED"
    grep -E "panicked|ERROR: |SUMMARY|Test unit written" "$log" | head -8 >&2
    art=$(grep -o 'fuzz/artifacts/[^ ]*\|artifacts/[^ ]*' "$log" | tail -1)
    die "fuzz target $t failed (log: $log); replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD[*]} $t ${art#fuzz/})"
  fi
  printf "| %-16s | %8s | %10s | %8s | %s\n" "$t" "$SECONDS_EACH" "${runs:-?}" "$size" ok
done
