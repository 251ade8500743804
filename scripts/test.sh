#!/usr/bin/env bash
# ringtun's whole test suite, from a fresh Debian 12 machine (run as root):
# installs what the tests need, then formatting, lints, unit/property tests, the network-namespace
# end-to-end tests, the independent Python HBONE peers, the kTLS tests inside a VM, the
# Kubernetes manifests, and a bounded fuzzing pass.
# Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# A one-off run gains nothing from incremental caches; they were a fifth of the build's disk.
export CARGO_INCREMENTAL=0

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the end-to-end tests create network namespaces and need root" >&2
  exit 1
fi

step "disk"
# The whole run (debug and fuzz builds, the kTLS VM images) needs several GiB free; when a build
# fails with "No space left on device", this line says what the machine had at the start.
df -h . | tail -n 1

step "system packages"
need_pkgs=(iproute2 nftables iptables qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio
  curl kmod xz-utils linux-perf valgrind)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "ok: ${need_pkgs[*]}"

step "python packages (independent HBONE peers)"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r tests/peers/requirements.txt
python3 -c 'import h2; print("h2", h2.__version__)'

if ! command -v cargo-nextest >/dev/null 2>&1; then
  step "cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

netns_before=$(ip netns list | awk '{print $1}' | sort)

step "tests (unit, property, network namespaces, python peers)"
cargo nextest run --workspace --locked --no-fail-fast

step "doc tests"
cargo test --workspace --locked --doc

if [ -x deploy/vm/test-ktls.sh ]; then
  step "kTLS inside a VM (Debian cloud kernel, CONFIG_TLS=m)"
  bash deploy/vm/test-ktls.sh
  step "kTLS inside a VM on a kernel past 6.14 (Debian trixie-backports 6.16: key updates on live sockets)"
  kernel=$(bash deploy/vm/fetch-kernel.sh)
  bash deploy/vm/test-ktls.sh --kernel "$kernel"
fi

step "Kubernetes manifests and Helm chart (rendered and schema-validated)"
bash deploy/validate-manifests.sh

step "fuzz targets, ${FUZZ_SECONDS:-30}s each"
bash scripts/fuzz.sh

step "benchmark harness smoke (tiny sizes, debug builds, no thresholds)"
# Checks that ringtun-bench still builds its topology, drives every test group through every
# contender (direct, ringtun, ringtun on its legacy epoll driver, the real ztunnel from
# ../shared/ztunnel, both in in-pod/shared mode with the fake node agent, and the bare relay:
# about 40 s of the run), splits the fixed-rate test's hops from a perf trace (--hops), counts
# instructions under callgrind (--instructions) and writes its report; the figures from a debug
# build mean nothing. --steal-limit=-1 has every measurement that reads the machine's CPU
# taken back and measured once more, as a host's steal would, so the repeat path runs too.
test -x ../shared/ztunnel/ztunnel || { echo "../shared/ztunnel/ztunnel is missing: the benchmark smoke needs the real ztunnel" >&2; exit 1; }
cargo build --locked -p ringtun -p ringtun-benches
smoke_out=target/ringtun-bench/ci-smoke
rm -rf "$smoke_out"
target/debug/ringtun-bench --ringtun target/debug/ringtun --runs 1 --bytes 4M --pingpongs 200 \
  --secs 1 --rate 200 --conns 200 --unpooled-conns 20 --idle-conns 100 --no-crosscheck \
  --only bulk,latency,rr,conn,unpooled,memory --contenders legacy,ztunnel,inpod,ztunnel-shared,bare-relay \
  --hops --instructions --steal-limit=-1 --steal-retries 1 --out "$smoke_out"
test -s "$smoke_out/results.json" && test -s "$smoke_out/report.html"
for c in ringtun ringtun-legacy ztunnel ringtun-inpod ztunnel-shared bare-relay; do
  grep -q "\"$c\"" "$smoke_out/results.json" || { echo "benchmark smoke: no figures for $c" >&2; exit 1; }
done
grep -q "hop 4 HBONE → client → app: tunnel's work p50" "$smoke_out/results.json" || { echo "benchmark smoke: no hop figures (--hops)" >&2; exit 1; }
grep -q "instructions per req (pair)" "$smoke_out/results.json" || { echo "benchmark smoke: no instruction counts (--instructions)" >&2; exit 1; }
grep -q "ringtun measured again (1 of at most 1)" "$smoke_out/results.json" || { echo "benchmark smoke: no repeated measurement noted (--steal-limit)" >&2; exit 1; }

step "leftover network namespaces"
left=$(comm -13 <(echo "$netns_before") <(ip netns list | awk '{print $1}' | sort))
if [ -n "$left" ]; then
  echo "tests left namespaces behind:" >&2; echo "$left" >&2; exit 1
fi
echo "none"

step "all tests passed"
