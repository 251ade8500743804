#!/usr/bin/env bash
# Runs the ringtun demo on a fresh Debian machine (as root): installs iproute2 and nftables if
# missing, builds ringtun and the demo (`ringtun-demo`, from the test bed in deploy/testbed),
# and starts two ringtuns in two network namespaces with a checked transfer through them. Extra
# arguments go to `ringtun-demo` (e.g. --once). RINGTUN_DEMO_PROFILE=dev builds a debug build
# instead of a release one; CARGO_TARGET_DIR is honoured.
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
profile="${RINGTUN_DEMO_PROFILE:-release}"
case "$profile" in
  release) out=release ;;
  dev) out=debug ;;
  *) echo "deploy/demo.sh: RINGTUN_DEMO_PROFILE is release or dev, not $profile" >&2; exit 2 ;;
esac
cargo build --profile "$profile" --locked -p ringtun -p ringtun-testbed
target="${CARGO_TARGET_DIR:-target}"
exec "$target/$out/ringtun-demo" --ringtun "$target/$out/ringtun" "$@"
