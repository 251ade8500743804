#!/usr/bin/env bash
# Fetch a current Debian cloud kernel (one that can take a new kTLS RX key after a peer's
# KeyUpdate, Linux 6.14 and later) for run-in-vm.sh, unpack it into a cache directory, and
# print the path of its kernel image:
#
#   deploy/vm/run-in-vm.sh --kernel "$(deploy/vm/fetch-kernel.sh)" -- cat /proc/net/tls_stat
#   deploy/vm/test-ktls.sh --kernel "$(deploy/vm/fetch-kernel.sh)"
#
# The package is pinned by name and SHA-256 (Debian trixie-backports); nothing is installed
# on the host: the .deb is unpacked under the cache directory (default
# ${XDG_CACHE_HOME:-~/.cache}/ringtun-vm, or $RINGTUN_VM_CACHE) with its modules.dep made
# there. A second call finds it there and downloads nothing. Needs curl, dpkg-deb, depmod
# (kmod) and sha256sum; the mirror is $RINGTUN_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

PROG=${0##*/}
# Linux 6.16 from trixie-backports, a Debian cloud kernel past 6.14, where kTLS learned to take
# new keys on a live socket (its /proc/net/tls_stat has the TlsRxRekey* counters).
KVER=6.16.12+deb13-cloud-amd64
DEB=linux-image-${KVER}_6.16.12-1~bpo13+1_amd64.deb
POOL=pool/main/l/linux-signed-amd64
SHA256=b56d926c1dc9bbdf151794753df57bd427af2398a033999016dcbbd211e8e461

MIRROR=${RINGTUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${RINGTUN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringtun-vm}
DIR=$CACHE/$KVER
IMAGE=$DIR/boot/vmlinuz-$KVER

die() {
	echo "$PROG: $*" >&2
	exit 2
}

if [ -r "$IMAGE" ] && [ -f "$DIR/usr/lib/modules/$KVER/modules.dep" ]; then
	echo "$IMAGE"
	exit 0
fi
for tool in curl dpkg-deb depmod sha256sum; do
	command -v "$tool" >/dev/null 2>&1 || die "needs $tool (apt-get install -y curl dpkg kmod coreutils)"
done
mkdir -p "$CACHE"
TMP=$(mktemp -d "$CACHE/fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "$PROG: downloading $MIRROR/$POOL/$DEB" >&2
curl -fsS --retry 3 -o "$TMP/$DEB" "$MIRROR/$POOL/$DEB" ||
	die "could not download $DEB from $MIRROR (set RINGTUN_DEBIAN_MIRROR to a mirror that has trixie-backports)"
echo "$SHA256  $TMP/$DEB" | sha256sum -c --quiet - >&2 || die "$DEB: SHA-256 mismatch"
dpkg-deb -x "$TMP/$DEB" "$TMP/root"
[ -r "$TMP/root/boot/vmlinuz-$KVER" ] || die "$DEB has no boot/vmlinuz-$KVER"
# depmod -b looks under BASE/lib/modules; the package is usr-merged.
ln -s usr/lib "$TMP/root/lib"
depmod -b "$TMP/root" "$KVER"
rm -rf "$DIR"
mv "$TMP/root" "$DIR"
echo "$IMAGE"
