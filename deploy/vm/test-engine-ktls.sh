#!/usr/bin/env bash
# ringtun's kTLS end-to-end tests inside the kTLS VM (two ringtuns in two network
# namespaces with kTLS on both sides, on one side, and with tiny TX and RX key budgets; the
# --ktls CLI checks). Shorthand for `test-ktls.sh --suite engine`; arguments are passed on:
#
#   deploy/vm/test-engine-ktls.sh [--timeout SECS] [-- extra libtest args, e.g. a test name]
exec "$(cd "$(dirname "$0")" && pwd)/test-ktls.sh" --suite engine "$@"
