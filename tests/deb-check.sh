#!/usr/bin/env bash
# Builds the .deb (packaging/deb.sh), installs it on this machine with `dpkg -i`, checks what it
# installed (the release binary, `keyrotd check` on the packaged inventory, the unit, the man
# page, the completions, the inventory as a conffile), then removes and purges it.
#
# Needs root (CI runs as root) and a machine where no keyrotd package is installed already.
# Usage: tests/deb-check.sh (run by .ci/run after tests/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "dpkg -i needs root (id -u is $(id -u))"
if dpkg-query -W -f='${Status}' keyrotd 2>/dev/null | grep -q installed; then
  fail "a keyrotd package is already installed here; not replacing it"
fi

deb=$(packaging/deb.sh)
built=$(date +%s)
echo "== dpkg -i $deb"
trap 'dpkg -P keyrotd >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb"
files=$(dpkg -L keyrotd)

# The binary is the release build, and it validates the packaged inventory at its default path.
release=${CARGO_TARGET_DIR:-target}/release/keyrotd
cmp /usr/bin/keyrotd "$release" || fail "/usr/bin/keyrotd is not $release"
out=$(/usr/bin/keyrotd check 2>&1) || fail "keyrotd check on /etc/keyrotd/config.toml: $out"
grep -q 'credential(s) OK' <<<"$out" || fail "keyrotd check printed: $out"
echo "$out" | head -n1
grep -q '/tmp/' /etc/keyrotd/config.toml && fail "the packaged inventory names /tmp"
dpkg-query -W -f='${Conffiles}\n' keyrotd | grep -q '^ /etc/keyrotd/config.toml ' ||
  fail "/etc/keyrotd/config.toml is not a conffile"

# The unit, the man page and the completions.
unit=$(grep -E '/systemd/system/keyrotd\.service$' <<<"$files") || fail "no unit in: $files"
grep -q '^ExecStart=/usr/bin/keyrotd run --config /etc/keyrotd/config.toml$' "$unit" ||
  fail "$unit does not start /usr/bin/keyrotd"
page=$(grep -E '/usr/share/man/man1/keyrotd\.1\.gz$' <<<"$files") || fail "no man page in: $files"
zcat "$page" | grep -q '^\.TH keyrotd 1' || fail "$page is not keyrotd's man page"
if command -v man >/dev/null; then
  [ "$(man -w keyrotd)" = "$page" ] || fail "man -w keyrotd gives '$(man -w keyrotd)', not $page"
fi
grep -q '_keyrotd' /usr/share/bash-completion/completions/keyrotd || fail "no bash completion"
[ -s /usr/share/zsh/vendor-completions/_keyrotd ] || fail "no zsh completion"
[ -s /usr/share/fish/vendor_completions.d/keyrotd.fish ] || fail "no fish completion"

echo "sizes: .deb $(stat -c %s "$deb") bytes, /usr/bin/keyrotd $(stat -c %s /usr/bin/keyrotd) bytes," \
  "installed $(dpkg-query -W -f='${Installed-Size}' keyrotd) KiB"

# Removal keeps the conffile (Debian policy); purging removes it.
dpkg -r keyrotd
[ ! -e /usr/bin/keyrotd ] || fail "dpkg -r left /usr/bin/keyrotd"
[ -e /etc/keyrotd/config.toml ] || fail "dpkg -r removed the conffile (only a purge should)"
dpkg -P keyrotd
[ ! -e /etc/keyrotd/config.toml ] || fail "dpkg -P left /etc/keyrotd/config.toml"
trap - EXIT
echo "== deb-check passed: build $((built - started)) s, install checks $(( $(date +%s) - built )) s"
