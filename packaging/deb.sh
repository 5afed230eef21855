#!/usr/bin/env bash
# Builds the Debian package target/debian/keyrotd_VERSION-1_ARCH.deb with cargo-deb (its
# [package.metadata.deb] is in Cargo.toml) and prints its path on the last line.
#
# It reuses the release build (`cargo build --release`, a no-op when it is current), generates
# the man page, the shell completions and the packaged inventory into target/deb-assets/, then
# runs `cargo deb --no-build`. The packaged /etc/keyrotd/config.toml is the example config.toml
# with its state and file stores moved from /tmp/keyrotd-example (fine for a try-out from the
# source tree, but private and wiped under the unit's PrivateTmp=yes) to /var/lib/keyrotd, the
# unit's StateDirectory.
#
# Usage: packaging/deb.sh (installs cargo-deb CARGO_DEB_VERSION with `cargo install` if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "== cargo install cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi

echo "== cargo build --release" >&2
cargo build --release --locked --bin keyrotd >&2
# cargo-deb finds `target/release/keyrotd` (Cargo.toml) in CARGO_TARGET_DIR when that is set.
bin=${CARGO_TARGET_DIR:-target}/release/keyrotd

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets"
"$bin" man >"$assets/keyrotd.1"
"$bin" completions bash >"$assets/keyrotd.bash"
"$bin" completions zsh >"$assets/_keyrotd"
"$bin" completions fish >"$assets/keyrotd.fish"
{
  echo "# Installed by the keyrotd package as /etc/keyrotd/config.toml: the example inventory from"
  echo "# the source tree, with its state and stores under /var/lib/keyrotd (the unit's"
  echo "# StateDirectory) instead of /tmp. Edit it, validate it with \`keyrotd check\`, then run"
  echo "# \`systemctl enable --now keyrotd\`. dpkg keeps your edits across upgrades (a conffile)."
  echo "#"
  sed -e 's#sqlite:/tmp/keyrotd-example/state\.db#sqlite:/var/lib/keyrotd/state.db#' \
    -e 's#/tmp/keyrotd-example/#/var/lib/keyrotd/example/#g' \
    -e 's#^\(\#   \)cargo run --release -- run --config config.toml#\1keyrotd run --config /etc/keyrotd/config.toml#' \
    config.toml
} >"$assets/config.toml"
if grep -n '/tmp/' "$assets/config.toml" >&2; then
  echo "packaging/deb.sh: the packaged inventory still names /tmp (lines above): adapt the sed" >&2
  exit 1
fi
"$bin" check --config "$assets/config.toml" >/dev/null

echo "== cargo deb" >&2
cargo deb --no-build --no-strip -p keyrotd --output target/debian/ >&2
ls -t target/debian/keyrotd_*.deb | head -n1
