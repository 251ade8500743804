#!/usr/bin/env bash
# Run host-built binaries inside a throwaway QEMU VM that boots Debian's cloud kernel
# (which ships kTLS as the `tls` module) from a busybox initramfs. See deploy/vm/README.md.
#
# Exit status: 0 when every command exited 0 and the guest reported it; 1 when a command
# failed or a marker is missing (guest crash, panic, truncated output); 2 for usage or
# missing host prerequisites; 124 when the timeout hit.
set -euo pipefail

PROG=${0##*/}

usage() {
	cat <<'EOF'
usage: run-in-vm.sh [OPTIONS] -- CMD [ARGS...] [--- CMD2 [ARGS...]]...

Boots the Debian cloud kernel in QEMU (TCG, no KVM needed) with a busybox initramfs,
runs each CMD in turn as root inside the guest, and exits non-zero if any of them
failed, the guest never reported back, or the timeout hit.

CMD is a host path (copied into the guest at the same absolute path, together with
every shared library `ldd` lists) or, without a '/', a busybox applet / a program
carried with --carry (resolved on the guest's PATH).

Options:
  --timeout SECS          wall-clock limit for the whole VM run (default 300)
  --append-modules M1,M2  load these kernel modules too (dependencies resolved)
  --modules M1,M2         replace the default module list (see README)
  --carry SRC[:DEST]      copy a host file or directory into the guest (DEST defaults
                          to SRC's absolute path); executables get their libraries too
  --env NAME=VALUE        export NAME=VALUE for the guest commands (repeatable)
  --workdir DIR           guest working directory for the commands (default /tmp)
  --kernel PATH           kernel image (default: newest /boot/vmlinuz-*-cloud-amd64,
                          or $RINGTUN_VM_KERNEL)
  --memory SIZE           guest memory (default 1G)
  --smp N                 guest CPUs (default 2)
  --no-strip              keep debug info in copied binaries (default: strip a copy)
  --gzip                  gzip the initramfs (default: plain cpio, which boots faster
                          under TCG because the guest does not have to inflate it)
  --keep                  keep the temporary build directory and print its path
  -h, --help              this text
EOF
}

die() {
	echo "$PROG: $*" >&2
	exit 2
}

# ---------------------------------------------------------------- arguments
TIMEOUT=300
MODULES_DEFAULT="tls gcm ghash-generic aesni-intel ghash-clmulni-intel chacha20poly1305 \
chacha-x86_64 poly1305-x86_64 \
veth dummy bridge nf_conntrack nf_nat nf_tables nft_chain_nat nft_nat nft_redir nft_ct \
nft_masq nft_tproxy nft_socket nft_fib_inet nft_reject_inet"
MODULES=$MODULES_DEFAULT
APPEND_MODULES=""
CARRY=()
ENVS=()
WORKDIR=/tmp
KERNEL=${RINGTUN_VM_KERNEL:-}
MEMORY=1G
SMP=2
STRIP=1
GZIP=0
KEEP=0

while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) TIMEOUT=${2:?--timeout needs SECS}; shift 2 ;;
	--append-modules) APPEND_MODULES="$APPEND_MODULES ${2//,/ }"; shift 2 ;;
	--modules) MODULES=${2//,/ }; shift 2 ;;
	--carry) CARRY+=("${2:?--carry needs SRC[:DEST]}"); shift 2 ;;
	--env)
		[[ ${2:-} == [A-Za-z_]*=* ]] || die "--env needs NAME=VALUE, got '${2:-}'"
		ENVS+=("$2"); shift 2 ;;
	--workdir) WORKDIR=${2:?}; shift 2 ;;
	--kernel) KERNEL=${2:?}; shift 2 ;;
	--memory) MEMORY=${2:?}; shift 2 ;;
	--smp) SMP=${2:?}; shift 2 ;;
	--no-strip) STRIP=0; shift ;;
	--gzip) GZIP=1; shift ;;
	--keep) KEEP=1; shift ;;
	-h | --help) usage; exit 0 ;;
	--) shift; break ;;
	*) usage >&2; die "unknown option '$1' (commands go after --)" ;;
	esac
done
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, got '$TIMEOUT'"
[ $# -gt 0 ] || { usage >&2; die "no command given (put it after --)"; }

# Split the remaining words into commands at each '---'.
CMDS=() # each entry: one shell-quoted command line for the guest
quote() { # single-quote for the guest's busybox sh
	local s=${1//\'/\'\\\'\'}
	printf "'%s'" "$s"
}
cur=""
HOST_BINS=()
first=1
for w in "$@"; do
	if [ "$w" = "---" ]; then
		[ -n "$cur" ] || die "empty command before '---'"
		CMDS+=("$cur"); cur=""; first=1; continue
	fi
	if [ $first = 1 ]; then
		if [[ $w == */* ]]; then
			[ -f "$w" ] || die "command '$w' does not exist on the host"
			[ -x "$w" ] || die "command '$w' is not executable"
			w=$(realpath "$w")
			HOST_BINS+=("$w")
		fi
		first=0
	fi
	cur="$cur $(quote "$w")"
done
[ -n "$cur" ] || die "empty command after '---'"
CMDS+=("$cur")

# ---------------------------------------------------------------- prerequisites
missing=()
pkgs=()
need() { # need CMD PACKAGE
	command -v "$1" >/dev/null 2>&1 || { missing+=("$1"); pkgs+=("$2"); }
}
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need ldd libc-bin
need timeout coreutils
[ $GZIP = 0 ] || need gzip gzip

if [ -z "$KERNEL" ]; then
	KERNEL=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
fi
if [ -z "$KERNEL" ] || [ ! -e "$KERNEL" ]; then
	missing+=("kernel image /boot/vmlinuz-*-cloud-amd64"); pkgs+=(linux-image-cloud-amd64)
fi
if [ ${#missing[@]} -gt 0 ]; then
	echo "$PROG: missing prerequisites: ${missing[*]}" >&2
	echo "$PROG: on Debian 12: apt-get install -y $(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')" >&2
	exit 2
fi
[ -r "$KERNEL" ] || die "cannot read $KERNEL (Debian installs it mode 0600: run as root, or chmod a+r it)"
BUSYBOX=$(command -v busybox)
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked; install busybox-static (apt-get install -y busybox-static)"
fi
KVER=${KERNEL##*/vmlinuz-}
# The guest always finds its modules at /lib/modules/<version>; on the host they are there for
# an installed kernel, or beside an unpacked one (deploy/vm/fetch-kernel.sh: DIR/boot/vmlinuz-V
# with DIR/usr/lib/modules/V).
GUEST_MODDIR=/lib/modules/$KVER
MODDIR=$GUEST_MODDIR
KBASE=$(dirname "$(dirname "$(realpath "$KERNEL")")")
for d in "$KBASE/lib/modules/$KVER" "$KBASE/usr/lib/modules/$KVER"; do
	if [ "$KBASE" != / ] && [ -f "$d/modules.dep" ]; then MODDIR=$d; break; fi
done
[ -f "$MODDIR/modules.dep" ] || die "no $MODDIR/modules.dep for kernel $KVER (reinstall linux-image-$KVER)"

# ---------------------------------------------------------------- initramfs
T0=$(date +%s.%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ringtun-vm.XXXXXX")
cleanup() { [ $KEEP = 1 ] && echo "$PROG: kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib,usr/bin,usr/sbin}
# Debian 12 is usr-merged but the guest does not need to be; keep paths as ldd prints them.

cp "$BUSYBOX" "$ROOT/bin/busybox"
# Applet links are made by the guest's /init (`busybox --install`): one process there
# instead of ~300 `ln` forks here. The kernel's request_module() runs /sbin/modprobe
# (e.g. for crypto algorithms) before any of that, so link it now.
ln -s ../bin/busybox "$ROOT/sbin/modprobe"
ln -s busybox "$ROOT/bin/sh"

# copy_at SRC DEST: copy a host file into the guest at DEST (following symlinks).
copy_at() {
	mkdir -p "$ROOT$(dirname "$2")"
	cp -L "$1" "$ROOT$2"
}
declare -A LIBS_DONE=()
# copy_libs FILE: copy every shared library and the loader `ldd` lists for FILE.
copy_libs() {
	local line lib
	# `ldd` prints "name => /path (addr)" and "/path/ld-linux.so (addr)" lines; static
	# binaries make it exit non-zero, which is fine.
	while read -r line; do
		lib=""
		case "$line" in
		*"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
		/*) lib=${line%% (*} ;;
		esac
		[ -n "$lib" ] || continue
		[ -n "${LIBS_DONE[$lib]:-}" ] && continue
		LIBS_DONE[$lib]=1
		copy_at "$lib" "$lib"
	done < <(ldd "$1" 2>/dev/null || true)
}
is_elf() { [ "$(head -c4 "$1" 2>/dev/null | od -An -c | tr -d ' \n')" = '177ELF' ]; }

for bin in "${HOST_BINS[@]}"; do
	[ -e "$ROOT$bin" ] && continue
	copy_at "$bin" "$bin"
	if [ $STRIP = 1 ] && command -v objcopy >/dev/null 2>&1; then
		# Debug info can be hundreds of MiB for test binaries; the guest unpacks the
		# initramfs into RAM, so drop it (symbols stay for backtraces).
		objcopy --strip-debug "$ROOT$bin" 2>/dev/null || true
	fi
	copy_libs "$bin"
done

for spec in "${CARRY[@]}"; do
	src=${spec%%:*}
	dest=${spec#*:}
	[ "$spec" = "$src" ] && dest=""
	[ -e "$src" ] || die "--carry: '$src' does not exist"
	src=$(realpath "$src")
	[ -n "$dest" ] || dest=$src
	[[ $dest == /* ]] || die "--carry: destination '$dest' must be absolute"
	mkdir -p "$ROOT$(dirname "$dest")"
	cp -a "$src" "$ROOT$dest"
	while IFS= read -r -d '' f; do
		if [ -x "$f" ] && is_elf "$f"; then copy_libs "$f"; fi
	done < <(find "$src" -type f -print0)
done

# Kernel modules: the closure of the requested modules from modules.dep, plus every
# crypto module, because the kernel requests algorithm modules (crypto-gcm(aes), ...)
# on demand through /sbin/modprobe.
WANTED=$(echo $MODULES $APPEND_MODULES)
# One awk pass over modules.dep: print the file of each wanted module and its
# dependencies; report names that are neither modules nor built in.
MOD_FILES=$(awk -v wanted="$WANTED" -v builtin="$MODDIR/modules.builtin" '
	function norm(p) { sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); return p }
	BEGIN {
		n = split(wanted, w, " ")
		for (i = 1; i <= n; i++) { k = w[i]; gsub(/-/, "_", k); want[k] = w[i] }
		while ((getline line < builtin) > 0) { b = norm(line); if (b in want) delete want[b] }
	}
	{
		name = $1; sub(/:$/, "", name); k = norm(name)
		if (k in want) {
			delete want[k]
			for (i = 1; i <= NF; i++) { f = $i; sub(/:$/, "", f); print f }
		}
	}
	END { for (k in want) print "MISSING " want[k] }' "$MODDIR/modules.dep" | sort -u)
if grep -q '^MISSING ' <<<"$MOD_FILES"; then
	die "kernel $KVER has no module(s): $(grep '^MISSING ' <<<"$MOD_FILES" | cut -d' ' -f2 | tr '\n' ' ')"
fi
mkdir -p "$ROOT$GUEST_MODDIR"
# shellcheck disable=SC2086 # word splitting of the file list is intended
(cd "$MODDIR" && cp --parents $MOD_FILES "$ROOT$GUEST_MODDIR/")
for d in kernel/crypto kernel/arch/x86/crypto kernel/lib/crypto; do
	[ -d "$MODDIR/$d" ] || continue
	(cd "$MODDIR" && cp -r --parents "$d" "$ROOT$GUEST_MODDIR/")
done
cp "$MODDIR"/modules.* "$ROOT$GUEST_MODDIR/"
# Newer Debian kernels ship xz-compressed modules; busybox's modprobe may not read them, so
# the guest gets them plain and a modules.dep that names them so.
if [ -n "$(find "$ROOT$GUEST_MODDIR" -name '*.ko.xz' -print -quit)" ]; then
	command -v xz >/dev/null || die "kernel $KVER has xz-compressed modules: apt-get install -y xz-utils"
	find "$ROOT$GUEST_MODDIR" -name '*.ko.xz' -exec xz -d {} +
	sed -i 's/\.ko\.xz/.ko/g' "$ROOT$GUEST_MODDIR"/modules.dep "$ROOT$GUEST_MODDIR"/modules.order
	rm -f "$ROOT$GUEST_MODDIR"/modules.*.bin
fi

cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF
echo 'hosts: files' >"$ROOT/etc/nsswitch.conf"
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"

# A per-run nonce makes the markers unforgeable by guest output that merely echoes
# "exit 0"-looking text.
NONCE=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
MARK="RINGTUN-VM-$NONCE"
{
	cat <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
echo "ringtun-vm: init started at uptime \$(cut -d" " -f1 /proc/uptime)s"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# The initramfs root is already RAM; a tmpfs over /tmp would hide files carried there.
[ -n "\$(ls -A /tmp)" ] || mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
ip link set lo up
# One modprobe process for all modules: each invocation re-parses modules.dep, which
# costs tens of milliseconds under TCG.
modprobe -a $WANTED || echo "ringtun-vm: modprobe -a failed; loaded: \$(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "ringtun-vm: modules loaded at uptime \$(cut -d" " -f1 /proc/uptime)s"
echo "ringtun-vm: kernel \$(uname -r), \$(nproc) cpus, modules: \$(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
if [ -e /proc/net/tls_stat ]; then
	echo "ringtun-vm: /proc/net/tls_stat present"
else
	echo "ringtun-vm: /proc/net/tls_stat absent (kTLS module not loaded)"
fi
EOF
	for e in "${ENVS[@]}"; do
		printf 'export %s=%s\n' "${e%%=*}" "$(quote "${e#*=}")"
	done
	printf 'cd %s || exit 1\n' "$(quote "$WORKDIR")"
	i=0
	for c in "${CMDS[@]}"; do
		printf 'echo "ringtun-vm: [%d] running:"%s\n' "$i" "$c"
		printf '%s\n' "$c"
		# The leading echo ends a last output line that lacks a newline, so the marker
		# always starts a line.
		printf 'rc=$?; echo; echo "%s EXIT %d $rc"\n' "$MARK" "$i"
		i=$((i + 1))
	done
	printf 'echo "%s DONE"\n' "$MARK"
	echo 'poweroff -f'
} >"$ROOT/init"
chmod 755 "$ROOT/init"

INITRD=$WORK/initramfs.cpio
if command -v cpio >/dev/null 2>&1; then
	(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$INITRD"
else
	# busybox's cpio can write newc archives too (no --null: names are plain here).
	(cd "$ROOT" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) >"$INITRD"
fi
if [ $GZIP = 1 ]; then
	gzip -1 "$INITRD"
	INITRD=$INITRD.gz
fi
T1=$(date +%s.%N)
echo "$PROG: initramfs $(du -h "$INITRD" | cut -f1) built in $(awk "BEGIN{printf \"%.1f\", $T1-$T0}")s; booting $KVER" >&2

# ---------------------------------------------------------------- boot
LOG=$WORK/console.log
BOOTS=3
boot=1
while :; do
	set +e
	# KVM is not assumed (CI runners and nested setups refuse it); TCG with multi-threading
	# boots this initramfs in a few seconds. -no-reboot turns a guest panic (panic=-1) into
	# a QEMU exit instead of a boot loop.
	timeout -k 5 "$TIMEOUT" qemu-system-x86_64 \
		-accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEMORY" \
		-nodefaults -no-user-config -display none -no-reboot \
		-serial stdio \
		-kernel "$KERNEL" -initrd "$INITRD" \
		-append "console=ttyS0 panic=-1 ${RINGTUN_VM_APPEND-quiet cryptomgr.notests}" </dev/null 2>&1 |
		tr -d '\r' | tee "$LOG"
	rc=${PIPESTATUS[0]}
	set -e
	# A guest kernel that panics in its own boot, before this script's init has run, has
	# tested nothing: multi-threaded TCG has tripped the kernel's live code patching there
	# (an int3 Oops in sched_clock_cpu booting 6.16 on an Intel host, the next boot fine).
	# Such a boot is tried again, at most $BOOTS in all; a panic once init has started is a
	# result like any other.
	if [ "$rc" != 124 ] && [ "$rc" != 137 ] && [ "$boot" -lt "$BOOTS" ] &&
		grep -q 'Kernel panic' "$LOG" && ! grep -q 'ringtun-vm: init started' "$LOG"; then
		echo "$PROG: the guest kernel panicked before init started (boot $boot of $BOOTS): booting again" >&2
		boot=$((boot + 1))
		continue
	fi
	break
done
T2=$(date +%s.%N)
echo "$PROG: VM ran $(awk "BEGIN{printf \"%.1f\", $T2-$T1}")s (qemu exit $rc)" >&2

if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
	echo "$PROG: FAIL: timeout after ${TIMEOUT}s" >&2
	exit 124
fi
status=0
i=0
for c in "${CMDS[@]}"; do
	got=$(grep -E "^$MARK EXIT $i [0-9]+$" "$LOG" | tail -n1 | awk '{print $4}')
	if [ -z "$got" ]; then
		echo "$PROG: FAIL: no exit marker for command [$i]:$c (guest crashed or hung?)" >&2
		status=1
	elif [ "$got" != 0 ]; then
		echo "$PROG: FAIL: command [$i] exited $got:$c" >&2
		status=1
	fi
	i=$((i + 1))
done
if ! grep -qE "^$MARK DONE$" "$LOG"; then
	echo "$PROG: FAIL: guest did not finish (no DONE marker)" >&2
	status=1
fi
[ "$rc" = 0 ] || { echo "$PROG: FAIL: qemu exited $rc" >&2; status=1; }
[ $status = 0 ] && echo "$PROG: OK: ${#CMDS[@]} command(s) passed" >&2
exit $status
