# SMTP sink (aiosmtpd, PyPI): every message lands as a file in $KEYROTD_TEST_SMTP_DIR.
# Sourced by tests/run.sh, which provides free_port, wait_for, pids and $KEYROTD_TEST_DIR.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "FATAL: aiosmtpd is not installed (pip install aiosmtpd)" >&2
  exit 1
fi
KEYROTD_TEST_SMTP_PORT=$(free_port)
KEYROTD_TEST_SMTP_DIR="$KEYROTD_TEST_DIR/smtp"
mkdir -p "$KEYROTD_TEST_SMTP_DIR"
python3 tests/support/smtp_sink.py "$KEYROTD_TEST_SMTP_PORT" "$KEYROTD_TEST_SMTP_DIR" \
  >"$KEYROTD_TEST_DIR/smtp.log" 2>&1 &
pids+=($!)
wait_for smtp python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', $KEYROTD_TEST_SMTP_PORT, timeout=2).quit()"
export KEYROTD_TEST_SMTP_PORT KEYROTD_TEST_SMTP_DIR
