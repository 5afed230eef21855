# PostgreSQL 15 (Debian `postgresql`): a throwaway cluster on a free loopback port.
# Sourced by tests/run.sh, which provides free_port, wait_for, pids and $KEYROTD_TEST_DIR.
#
# Exports:
#   KEYROTD_TEST_PG_PORT        the cluster's port on 127.0.0.1
#   KEYROTD_TEST_PG_ADMIN_DSN   the superuser `admin`'s connection string (a secret: tests pass it
#                               to the rotator as an env: reference)
#   KEYROTD_TEST_PG_CA          the CA certificate (PEM) of the server's TLS certificate; the server
#                               accepts TLS and plain connections alike
#   KEYROTD_TEST_PG_LOG         the server log (log_statement=ddl)
# Roles app, app_a and app_b exist with LOGIN and a known starting password (`start-<role>`).

pg_bin=/usr/lib/postgresql/15/bin
for tool in initdb pg_ctl postgres; do
  if [ ! -x "$pg_bin/$tool" ]; then
    echo "FATAL: $pg_bin/$tool is missing; install the server with: apt-get install -y postgresql" >&2
    exit 1
  fi
done

pg_dir="$KEYROTD_TEST_DIR/postgres"
mkdir -p "$pg_dir"
pg_admin_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
printf '%s\n' "$pg_admin_password" > "$pg_dir/pwfile"

# initdb and the server refuse to run as root: the cluster belongs to `postgres`.
pg_as() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}
if [ "$(id -u)" = 0 ]; then
  chown -R postgres: "$pg_dir"
  # postgres must be able to reach its data directory.
  chmod o+x "$KEYROTD_TEST_DIR"
fi

pg_as "$pg_bin/initdb" -D "$pg_dir/data" -A scram-sha-256 -U admin --pwfile="$pg_dir/pwfile" \
  >"$pg_dir/initdb.log" 2>&1 || { echo "FATAL: initdb failed; see $pg_dir/initdb.log" >&2; exit 1; }
rm -f "$pg_dir/pwfile"

# TLS: a throwaway CA and a server certificate for 127.0.0.1, so sslmode=require can be tested.
pg_tls="$pg_dir/tls"
mkdir -p "$pg_tls"
{
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=keyrotd test CA" -keyout "$pg_tls/ca.key" -out "$pg_tls/ca.crt" &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$pg_tls/server.key" -out "$pg_tls/server.csr" &&
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    >"$pg_tls/server.ext" &&
  openssl x509 -req -in "$pg_tls/server.csr" -CA "$pg_tls/ca.crt" -CAkey "$pg_tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$pg_tls/server.ext" -out "$pg_tls/server.crt"
} >"$pg_dir/openssl.log" 2>&1 || { echo "FATAL: openssl could not make test certificates; see $pg_dir/openssl.log" >&2; exit 1; }
chmod 600 "$pg_tls/server.key"
if [ "$(id -u)" = 0 ]; then chown -R postgres: "$pg_tls"; fi
export KEYROTD_TEST_PG_CA="$pg_tls/ca.crt"

KEYROTD_TEST_PG_PORT=$(free_port)
pg_as "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
  -o "-p $KEYROTD_TEST_PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c log_statement=ddl -c ssl=on -c ssl_cert_file=$pg_tls/server.crt -c ssl_key_file=$pg_tls/server.key" start \
  >"$pg_dir/pg_ctl.log" 2>&1 || { echo "FATAL: PostgreSQL did not start; see $pg_dir/server.log" >&2; exit 1; }
# The postmaster's pid is the first line of postmaster.pid; run.sh's cleanup stops it (SIGTERM
# is PostgreSQL's "smart" shutdown; the data directory is thrown away anyway).
pids+=("$(head -n1 "$pg_dir/data/postmaster.pid")")

export KEYROTD_TEST_PG_PORT
export KEYROTD_TEST_PG_ADMIN_DSN="host=127.0.0.1 port=$KEYROTD_TEST_PG_PORT user=admin password=$pg_admin_password dbname=postgres sslmode=disable"
export KEYROTD_TEST_PG_LOG="$pg_dir/server.log"

wait_for postgres env PGPASSWORD="$pg_admin_password" psql -h 127.0.0.1 -p "$KEYROTD_TEST_PG_PORT" -U admin -d postgres -c 'SELECT 1'
PGPASSWORD="$pg_admin_password" psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$KEYROTD_TEST_PG_PORT" -U admin -d postgres <<'SQL' \
  || { echo "FATAL: could not create the test roles" >&2; exit 1; }
CREATE ROLE app LOGIN PASSWORD 'start-app';
CREATE ROLE app_a LOGIN PASSWORD 'start-app_a';
CREATE ROLE app_b LOGIN PASSWORD 'start-app_b';
SQL
echo "PostgreSQL on 127.0.0.1:$KEYROTD_TEST_PG_PORT (log $KEYROTD_TEST_PG_LOG)"
