#!/usr/bin/env bash
# Build the kTLS tests on the host and run them inside the kTLS VM with
# RINGTUN_EXPECT_KTLS=1 (a missing kTLS fails the run instead of skipping or falling back):
#
#   crate   the tls-kernel-offload tests (unit tests and tests/*.rs)
#   engine  ringtun's kTLS end-to-end tests (engine/tests/e2e_ktls.rs: two ringtuns in two
#           network namespaces, kTLS on both sides / one side / TX and RX key budgets), the record
#           handling at and after the switch against an offloaded hand-made client
#           (engine/tests/ktls_records.rs) and the --ktls CLI tests
#           (engine/tests/ktls_cli.rs); carries the ringtun binary, ip and nft
#
#   deploy/vm/test-ktls.sh [--suite crate|engine|all] [--timeout SECS] [--kernel PATH]
#                          [-- extra libtest args]
#
# --kernel boots another kernel image (run-in-vm.sh --kernel), e.g. the one
# deploy/vm/fetch-kernel.sh prints: the same tests on a kernel past 6.14.
#
# Default: both suites in one VM. Needs cargo, iproute2 and nftables (engine suite) plus
# what run-in-vm.sh needs (it says what is missing).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TIMEOUT=600
SUITE=all
KERNEL_OPT=()
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--suite) SUITE=${2:?}; shift 2 ;;
	--kernel) KERNEL_OPT=(--kernel "${2:?}"); shift 2 ;;
	--) shift; break ;;
	-h | --help) sed -n '2,19p' "$0"; exit 0 ;;
	*) echo "test-ktls.sh: unknown option $1" >&2; exit 2 ;;
	esac
done
case "$SUITE" in
crate | engine | all) ;;
*) echo "test-ktls.sh: --suite must be crate, engine or all (got '$SUITE')" >&2; exit 2 ;;
esac
want() { [ "$SUITE" = all ] || [ "$SUITE" = "$1" ]; }

cd "$REPO"
# Test executables from one `cargo test --workspace --no-run`: the same feature resolution as
# the workspace test run before it (scripts/test.sh), so nothing is rebuilt; `-p` selections
# would resolve features per package and rebuild most dependencies. Prints, one per line, the
# test executables of package $1 (all of them, or only the integration tests named after it)
# and, with `bin:NAME`, that binary.
ARTIFACTS=$(mktemp "${TMPDIR:-/tmp}/ringtun-ktls-artifacts.XXXXXX")
SCRATCH=""
trap 'rm -rf "$ARTIFACTS" ${SCRATCH:+"$SCRATCH"}' EXIT
cargo test --workspace --no-run --message-format=json-render-diagnostics >"$ARTIFACTS"
executables() {
	python3 - "$ARTIFACTS" "$@" <<'PY'
import json, sys
path, package, *wanted = sys.argv[1:]
bins = {w[4:] for w in wanted if w.startswith("bin:")}
tests = {w for w in wanted if not w.startswith("bin:")}
out = set()
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe:
        continue
    pkg = m["package_id"]
    # "path+file:///…/engine#ringtun@0.1.0", "path+file:///…/hbone#0.1.0" (name = directory),
    # or, from older cargo, "ringtun 0.1.0 (path+…)".
    if "#" in pkg:
        url, frag = pkg.rsplit("#", 1)
        name = frag.split("@")[0] if "@" in frag else url.rstrip("/").rsplit("/", 1)[-1]
    else:
        name = pkg.split(" ")[0]
    if name != package:
        continue
    target = m["target"]
    if m["profile"]["test"]:
        if not tests or target["name"] in tests:
            out.add(exe)
    elif "bin" in target["kind"] and target["name"] in bins:
        out.add(exe)
for e in sorted(out):
    print(e)
PY
}

TESTS=()
VM_OPTS=()
if want crate; then
	mapfile -t BINS < <(executables tls-kernel-offload)
	[ ${#BINS[@]} -gt 0 ] || { echo "test-ktls.sh: cargo produced no tls-kernel-offload test executables" >&2; exit 1; }
	TESTS+=("${BINS[@]}")
fi
if want engine; then
	for tool in ip nft; do
		command -v "$tool" >/dev/null 2>&1 || {
			echo "test-ktls.sh: the engine suite needs '$tool' on the host to carry into the VM (apt-get install -y iproute2 nftables)" >&2
			exit 2
		}
	done
	# The test binaries plus the ringtun binary they run (CARGO_BIN_EXE_ringtun, an
	# absolute host path baked into them, so it goes to the same path in the guest).
	mapfile -t BINS < <(executables ringtun e2e_ktls ktls_records ktls_cli bin:ringtun)
	RINGTUN=""
	for b in "${BINS[@]}"; do
		case "$b" in
		*/deps/*) TESTS+=("$b") ;;
		*/ringtun) RINGTUN=$b ;;
		esac
	done
	[ -n "$RINGTUN" ] || { echo "test-ktls.sh: cargo did not name the ringtun binary" >&2; exit 1; }
	# run-in-vm.sh strips debug info from commands, not from carried files: strip a copy
	# (130 MiB -> 16 MiB for a debug build; the guest unpacks everything into RAM).
	SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ringtun-ktls-vm.XXXXXX")
	if command -v objcopy >/dev/null 2>&1; then
		objcopy --strip-debug "$RINGTUN" "$SCRATCH/ringtun"
	else
		cp "$RINGTUN" "$SCRATCH/ringtun"
	fi
	VM_OPTS+=(--carry "$SCRATCH/ringtun:$RINGTUN")
	# iproute2's ip (netns, veth) and nft (capture rules), found first on the guest's PATH:
	# busybox's ip has no `netns`.
	VM_OPTS+=(--carry "$(command -v ip)" --carry "$(command -v nft)")
	VM_OPTS+=(--env PATH=/usr/sbin:/usr/bin:/sbin:/bin)
fi

ARGS=()
for b in "${TESTS[@]}"; do
	[ ${#ARGS[@]} -gt 0 ] && ARGS+=(---)
	# One test at a time: the crate tests assert on per-namespace /proc/net/tls_stat
	# counters, and the guest has two emulated CPUs anyway.
	ARGS+=("$b" --test-threads=1 "$@")
done

ENVS=(--env RINGTUN_EXPECT_KTLS=1 --env RUST_BACKTRACE=1)
# Knobs the tests read, forwarded when set on the host.
for v in RINGTUN_KTLS_BULK_MIB RINGTUN_KTLS_E2E_MIB RINGTUN_E2E_LOG RUST_LOG; do
	[ -n "${!v:-}" ] && ENVS+=(--env "$v=${!v}")
done

# Not exec: the trap removes the stripped copy afterwards.
"$HERE/run-in-vm.sh" --timeout "$TIMEOUT" "${KERNEL_OPT[@]}" "${ENVS[@]}" "${VM_OPTS[@]}" -- "${ARGS[@]}"
