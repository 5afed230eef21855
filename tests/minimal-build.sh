#!/usr/bin/env bash
# Builds keyrotd without its optional providers (`--no-default-features`: the `random` rotator,
# the `file` store and local secret references only), lints that combination, and checks that
# the small binary works: it rotates a credential end to end, and it refuses an inventory that
# names a provider it was built without, naming the missing cargo feature.
#
# Usage: tests/minimal-build.sh (run by .ci/run after the test suite; it replaces
# target/debug/keyrotd with the small binary, which the next `cargo test` relinks).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build --no-default-features"
cargo build --locked --no-default-features
cargo clippy --locked --no-default-features -p keyrotd -p keyrotd-providers -p keyrotd-plugin \
  -- -D warnings
work=$(mktemp -d /tmp/keyrotd-minimal.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp "${CARGO_TARGET_DIR:-target}/debug/keyrotd" "$work/keyrotd"
echo "binary: $(du -h "$work/keyrotd" | cut -f1) (debug build)"

fail() { echo "FAIL: $*" >&2; exit 1; }

# A rotation end to end: issue, stage, verify, promote into a 0600 file.
mkdir -m 0700 "$work/out"
cat >"$work/ok.toml" <<EOF
[daemon]
state = "sqlite:$work/state/keyrotd.db"
[[credential]]
id = "token"
rotator = { kind = "random", length = 32 }
store = { kind = "file", path = "$work/out/token" }
rotate_every = "30d"
max_age = "35d"
grace = "1h"
EOF
"$work/keyrotd" check --config "$work/ok.toml" >/dev/null || fail "check refused a random/file inventory"
"$work/keyrotd" rotate token --config "$work/ok.toml" >/dev/null 2>"$work/rotate.log" ||
  fail "rotate failed: $(cat "$work/rotate.log")"
[ "$(stat -c %a "$work/out/token")" = 600 ] || fail "the store file is not 0600"
[ "$(tr -d '\n' <"$work/out/token" | wc -c)" -eq 32 ] || fail "the stored token is not 32 characters"

# A provider left out of the build: refused at load time (exit 2), naming the feature.
sed 's/kind = "random", length = 32/kind = "aws_iam_access_key", user_name = "ci"/' \
  "$work/ok.toml" >"$work/aws.toml"
set +e
out=$("$work/keyrotd" check --config "$work/aws.toml" 2>&1)
code=$?
set -e
[ "$code" -eq 2 ] || fail "an aws_iam_access_key inventory gave exit $code, not 2: $out"
grep -q 'built without the `aws` cargo feature' <<<"$out" || fail "no feature named: $out"
grep -q "aws.toml:[0-9]*:[0-9]*: credential\[token\]\.rotator\.kind: " <<<"$out" || fail "no file:line:col: field: $out"
echo "minimal build: ok"
