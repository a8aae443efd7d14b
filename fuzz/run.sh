#!/usr/bin/env bash
# Runs the fuzz targets for a bounded time each, starting from the committed seeds, and fails
# if any of them finds a crash, a leak, an allocation over the limit or a timeout.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 600 s each, every target
#   FUZZ_PARALLEL=2 fuzz/run.sh 600       # two targets at a time
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). It uses nightly-only compiler flags;
# on a stable toolchain RUSTC_BOOTSTRAP=1 allows them. Inputs found along the way go to
# fuzz/corpus/<target>/, crashes to fuzz/artifacts/<target>/, logs to $FUZZ_LOGS (default
# fuzz/target/logs); all of them are ignored by git. A crash input that was fixed belongs in
# fuzz/seeds/<target>/ as `crash-<what>`, with a regression test next to the decoder.
set -uo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame request peer node config)
parallel=${FUZZ_PARALLEL:-1}
logs=${FUZZ_LOGS:-fuzz/target/logs}
mkdir -p "$logs"

export RUSTC_BOOTSTRAP=1
# Release code with debug assertions and overflow checks, under AddressSanitizer.
build_flags=(--release --debug-assertions)
cargo fuzz build "${build_flags[@]}" || exit 1

run_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  # One fuzzing process per target. -rss_limit_mb and -malloc_limit_mb turn a runaway
  # allocation (a length prefix believed, say) into a reported crash.
  cargo fuzz run "${build_flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=512 -malloc_limit_mb=512 -timeout=10 \
    -max_len=16384 -print_final_stats=1 >"$logs/$t.log" 2>&1
}

summary() {
  local t=$1 log="$logs/$1.log"
  local done_line execs rate
  done_line=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -1)
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | awk '{print $2}')
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | awk '{print $2}')
  echo "$t: executions=${execs:-?} exec/s=${rate:-?} | ${done_line:-no status line}"
}

failed=()
pending=("${targets[@]}")
while [ ${#pending[@]} -gt 0 ]; do
  batch=("${pending[@]:0:$parallel}")
  pending=("${pending[@]:$parallel}")
  pids=()
  for t in "${batch[@]}"; do
    echo "== fuzzing $t for ${secs}s (log: $logs/$t.log)"
    run_one "$t" &
    pids+=($!)
  done
  for i in "${!batch[@]}"; do
    t=${batch[$i]}
    if ! wait "${pids[$i]}"; then
      failed+=("$t")
      echo "!! $t failed; see $logs/$t.log and fuzz/artifacts/$t/"
    fi
    summary "$t"
  done
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all targets ran ${secs}s without a crash"
