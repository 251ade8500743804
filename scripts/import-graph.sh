#!/usr/bin/env bash
# Prints the module import graph of engine/src (files, then top-level modules) and the circles
# in it; exits non-zero on a circle that engine/tests/import_graph.rs does not list as pending.
# The same check runs in `cargo test` / `cargo nextest run`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test -q -p ringtun --test import_graph -- --nocapture --test-threads 1 \
  engine_modules_import_each_other_without_circles
