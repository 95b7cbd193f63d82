# Shared by run-short and run-long (sourced): installs cargo-fuzz when missing, builds every
# target, writes the seed corpus, and runs one target with a summary line per target.
# shellcheck shell=bash

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$FUZZ_DIR" || exit 1
# The fuzz crate is built with libFuzzer's instrumentation flags: its own target dir, outside
# the checkout, so it never invalidates the workspace's cache.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/fuzz-target}
# cargo fuzz passes -Z flags to rustc; the stable toolchain takes them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
# ASan is possible (the stable toolchain ships its runtime) but needs a second full build; the
# code under test forbids unsafe, so the default is libFuzzer's coverage guidance alone.
SANITIZER=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.2

# cargo-fuzz lives in the project's cache, keyed by version, so a cold run (empty cache)
# installs it as a fresh machine would, whatever an earlier `cargo install` left in ~/.cargo.
FUZZ_TOOLS=${DERP_FLEET_CACHE:-$HOME/.cache/derp-fleet}/tools/cargo-fuzz-$CARGO_FUZZ_VERSION
export PATH=$FUZZ_TOOLS/bin:$PATH

ensure_cargo_fuzz() {
    if [ -x "$FUZZ_TOOLS/bin/cargo-fuzz" ]; then
        return 0
    fi
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io into $FUZZ_TOOLS"
    # Its own target dir: the fuzz one is built with other flags and would be invalidated.
    # --debug: cargo-fuzz only drives cargo; optimising it costs a cold run minutes for nothing.
    CARGO_TARGET_DIR=$FUZZ_TOOLS.build cargo install cargo-fuzz --debug --locked --version "$CARGO_FUZZ_VERSION" \
        --root "$FUZZ_TOOLS" && rm -rf "$FUZZ_TOOLS.build"
}

build_all() {
    cargo fuzz build -O --sanitizer "$SANITIZER"
}

targets() {
    cargo fuzz list
}

PASSED=0
FAILED=0
# run_target NAME LOGFILE [libFuzzer flags...]: runs one target on its corpus, reports it.
run_target() {
    local t=$1 log=$2
    shift 2
    mkdir -p "corpus/$t" "artifacts/$t" "$(dirname "$log")"
    local start=$SECONDS
    cargo fuzz run -O --sanitizer "$SANITIZER" "$t" "corpus/$t" -- \
        -artifact_prefix="artifacts/$t/" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "$@" >"$log" 2>&1
    local rc=$?
    local runs rate
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    if [ $rc -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'ok    %-20s %12s execs %9s exec/s %5ss\n' "$t" "${runs:-?}" "${rate:-?}" $((SECONDS - start))
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL  %-20s %12s execs %9s exec/s %5ss (exit %s, log %s)\n' "$t" "${runs:-?}" "${rate:-?}" $((SECONDS - start)) "$rc" "$log"
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written to|deadly signal|timeout' "$log" | head -8 | sed 's/^/      /'
        local repro
        repro=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //')
        if [ -n "$repro" ]; then
            echo "      reproducer: fuzz/$repro"
            echo "      replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --sanitizer $SANITIZER $t $repro)"
        fi
    fi
}
