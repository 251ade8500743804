#!/usr/bin/env bash
# The kTLS zero-copy benchmark (benches/src/bin/ktls_zerocopy/) inside the kTLS VM: plain
# io_uring sends against SEND_ZC, MSG_ZEROCOPY, sendfile and splice on a kTLS TX socket, each
# run checked byte for byte at the receiver. Prints the table that
# docs/measurements/ktls-zero-copy.md quotes. Not in CI: ~15 minutes under TCG.
#
#   deploy/vm/bench-ktls-zerocopy.sh [--timeout SECS] [--no-plain] [-- ktls_zerocopy args]
#
# Default ktls_zerocopy args: --mib 8 --reps 5 (sizes 16, 64, 256 KiB; AES-128-GCM). After
# the kTLS run, the same binary runs once with --plain (no TLS, 3 reps) in the same boot: what
# the copies cost when no encryption hides them. TCG numbers are for ratios within one boot,
# never absolute performance.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TIMEOUT=2400
PLAIN=1
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--no-plain) PLAIN=0; shift ;;
	--) shift; break ;;
	-h | --help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "bench-ktls-zerocopy.sh: unknown option $1" >&2; exit 2 ;;
	esac
done
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--mib 8 --reps 5)

cd "$REPO"
cargo build --release -p ringtun-benches --bin ktls_zerocopy
BIN=$REPO/target/release/ktls_zerocopy
CMDS=("$BIN" "${ARGS[@]}")
if [ $PLAIN = 1 ]; then
	CMDS+=(--- "$BIN" --plain --mib 32 --reps 3)
fi
exec "$HERE/run-in-vm.sh" --timeout "$TIMEOUT" --env RUST_BACKTRACE=1 -- "${CMDS[@]}"
