#!/usr/bin/env bash
# Build the tls-kernel-offload test binaries on the host and run them inside the kTLS VM
# with RINGTUN_EXPECT_KTLS=1 (a missing kTLS fails the run instead of skipping).
#
#   deploy/vm/test-ktls.sh [--timeout SECS] [-- extra libtest args, e.g. a test name]
#
# Needs cargo plus what run-in-vm.sh needs (it says what is missing).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TIMEOUT=600
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--) shift; break ;;
	-h | --help) sed -n '2,7p' "$0"; exit 0 ;;
	*) echo "test-ktls.sh: unknown option $1" >&2; exit 2 ;;
	esac
done

cd "$REPO"
# libtest binaries for the crate: the unit tests and tests/*.rs. `--message-format=json`
# names each executable; the compiler messages go to stderr via the human rendering.
mapfile -t BINS < <(
	cargo test -p tls-kernel-offload --no-run --message-format=json-render-diagnostics |
		grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' | sort -u
)
[ ${#BINS[@]} -gt 0 ] || { echo "test-ktls.sh: cargo produced no test executables" >&2; exit 1; }

ARGS=()
for b in "${BINS[@]}"; do
	[ ${#ARGS[@]} -gt 0 ] && ARGS+=(---)
	# One test at a time: the tests assert on per-namespace /proc/net/tls_stat counters,
	# and the guest has two emulated CPUs anyway.
	ARGS+=("$b" --test-threads=1 "$@")
done

ENVS=(--env RINGTUN_EXPECT_KTLS=1 --env RUST_BACKTRACE=1)
# Knobs the tests read, forwarded when set on the host.
for v in RINGTUN_KTLS_BULK_MIB RUST_LOG; do
	[ -n "${!v:-}" ] && ENVS+=(--env "$v=${!v}")
done

exec "$HERE/run-in-vm.sh" --timeout "$TIMEOUT" "${ENVS[@]}" -- "${ARGS[@]}"
