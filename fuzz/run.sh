#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time each and fails if any of them
# crashes or fails an assertion. Installs nothing: it needs cargo-fuzz on PATH (CI installs it).
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      # default 60 s each, every target
#   FUZZ_SANITIZER=none fuzz/run.sh 30 decode         # without AddressSanitizer
#   FUZZ_JOBS=2 fuzz/run.sh 3600                      # long run, two processes per target
#   FUZZ_BUILD=dev FUZZ_SANITIZER=none fuzz/run.sh 20 # CI: quickest build, slower runs
#
# The committed seeds in corpus/<target>/ are read, never written: libFuzzer adds what it finds
# to work/<target>/ (ignored by git), which later runs start from too. Crashes land in
# artifacts/<target>/ (see README.md for turning one into a regression test). Only the stable
# toolchain exists here: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Zsanitizer flag.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-${FUZZ_SECONDS:-60}}"
shift || true
sanitizer="${FUZZ_SANITIZER:-address}"
build_mode="${FUZZ_BUILD:-release}"
jobs="${FUZZ_JOBS:-1}"
all_targets=(decode steering config snapshot log)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all_targets[@]}")
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
# Debug assertions and overflow checks on: the decoder's unchecked reads are bounds-checked
# under them, and an overflow in a hostile file is exactly what we look for.
build_args=(-a -s "$sanitizer")
case "$build_mode" in
    release) ;;
    # Unoptimized: a fraction of the build time, several times fewer executions a second.
    dev) build_args+=(--dev) ;;
    *)
        echo "FUZZ_BUILD must be release or dev" >&2
        exit 2
        ;;
esac

echo "fuzz: building ${targets[*]} ($build_mode, sanitizer $sanitizer)"
mkdir -p work
build() {
    if ! cargo fuzz build "${build_args[@]}" "$@" >work/build.log 2>&1; then
        tail -60 work/build.log >&2
        echo "fuzz: build failed (fuzz/work/build.log)" >&2
        exit 1
    fi
}
if [ ${#targets[@]} -eq ${#all_targets[@]} ]; then
    build
else
    for t in "${targets[@]}"; do
        build "$t"
    done
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t"
    log="work/$t.log"
    args=(-max_total_time="$seconds" -timeout=20 -print_final_stats=1)
    case "$t" in
        # Generated configs and built log files need long inputs from the start.
        config | log) args+=(-len_control=0 -max_len=4096) ;;
    esac
    if [ -f "dicts/$t.dict" ]; then
        args+=(-dict="dicts/$t.dict")
    fi
    if [ "$jobs" -gt 1 ]; then
        args+=(-fork="$jobs" -ignore_crashes=0)
    fi
    echo "fuzz: $t for ${seconds}s"
    start=$(date +%s)
    status=0
    cargo fuzz run "${build_args[@]}" "$t" "work/$t" "corpus/$t" -- "${args[@]}" >"$log" 2>&1 \
        || status=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    fi
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        summary+=("$t: FAILED after ${took}s (exit $status); see fuzz/$log and fuzz/artifacts/$t/")
        tail -40 "$log" >&2
    else
        summary+=("$t: ok, ${took}s, ${execs:-?} executions")
    fi
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
