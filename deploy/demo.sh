#!/usr/bin/env bash
# Runs `ringtun demo` on a fresh Debian machine (as root): installs iproute2 and nftables if
# missing, builds ringtun, and starts two ringtuns in two network namespaces with a checked
# transfer through them. Extra arguments go to `ringtun demo` (e.g. --once).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "deploy/demo.sh: the demo creates network namespaces; run it as root" >&2
  exit 1
fi
if ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 nftables >/dev/null
fi
cargo build --release --locked -p ringtun
exec target/release/ringtun demo "$@"
