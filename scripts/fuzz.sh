#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 30) from its seed corpus.
# A crash fails the script; its input is left in fuzz/artifacts/<target>/ to turn into a
# regression test. The stable toolchain needs RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-30}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz@0.12.0
fi
export RUSTC_BOOTSTRAP=1
# No sanitizer: the targets are safe Rust, where a bug shows up as a panic (which libFuzzer
# reports as a crash); skipping ASan halves the build time on CI's two cores.
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  work=$(mktemp -d)
  cp -r "corpus/$target/." "$work/"
  echo "fuzz: $target for ${secs}s"
  cargo fuzz run --sanitizer none "$target" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
  rm -rf "$work"
done
