#!/usr/bin/env bash
# Runs the whole test suite against real servers on loopback.
#
# Every file in tests/backends/ is sourced in order: each starts one server in $KEYROTD_TEST_DIR
# and exports the variables the tests read (KEYROTD_TEST_*). A backend that cannot start makes the
# whole run fail: no test is skipped for a missing server. Servers are stopped on exit.
#
# The tests that need these servers (or Prometheus) are #[ignore]d, so that a plain `cargo test`
# passes on a machine without them and reports them as ignored; this script runs every test,
# ignored or not (`--include-ignored`), with KEYROTD_BACKENDS=1 set.
#
# Usage: tests/run.sh [extra cargo test args [-- test binary args]]
#   e.g. tests/run.sh --test integration daemon::     (one module of the daemon's test binary)
#        tests/run.sh -p keyrotd-providers -- --test-threads 1
#        tests/run.sh --exec cargo bench --bench postgres   (CMD with the backends up, no tests)
set -euo pipefail
cd "$(dirname "$0")/.."

export KEYROTD_TEST_DIR="${KEYROTD_TEST_DIR:-$(mktemp -d /tmp/keyrotd-test.XXXXXX)}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# free_port: prints a TCP port that is free on 127.0.0.1 right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for NAME CMD...: retries CMD for up to 30 s; fails the run loudly if it never succeeds.
wait_for() {
  local name=$1; shift
  for _ in $(seq 1 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "FATAL: backend $name did not come up; see $KEYROTD_TEST_DIR" >&2
  exit 1
}

for backend in tests/backends/*.sh; do
  [ -e "$backend" ] || continue
  echo "== starting backend $(basename "$backend" .sh)"
  # shellcheck source=/dev/null
  source "$backend"
done

export KEYROTD_BACKENDS=1
# --exec CMD...: runs CMD with the backends up instead of the test suite (a bench, say).
if [ "${1:-}" = "--exec" ]; then
  shift
  "$@"
  exit
fi
# --include-ignored goes to the test binaries: after the caller's `--` if there is one.
cargo_args=() binary_args=(--include-ignored)
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--" ]; then
    binary_args+=("${@:i+1}")
    break
  fi
  cargo_args+=("${!i}")
done
echo "== cargo test (backends in $KEYROTD_TEST_DIR)"
cargo test --workspace --locked "${cargo_args[@]}" -- "${binary_args[@]}"
