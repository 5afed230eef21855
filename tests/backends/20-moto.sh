# Sourced by tests/run.sh: starts moto_server (the AWS emulator) with IAM enforced.
#
# moto accepts any credentials until INITIAL_NO_AUTH_ACTION_COUNT unauthenticated calls have been
# made; we spend exactly those calls creating an admin user with an inline "Action": "*" policy and
# an access key, so afterwards a deleted or unknown key is refused (STS answers
# InvalidClientTokenId) and the IAM rotator's verify step can really fail.
#
# Exports KEYROTD_TEST_MOTO_URL, KEYROTD_TEST_AWS_ACCESS_KEY_ID, KEYROTD_TEST_AWS_SECRET_ACCESS_KEY.
# Needs `pip install 'moto[server]'` (which brings boto3).

if ! command -v moto_server >/dev/null 2>&1; then
  echo "FATAL: moto_server is not installed; run: pip install 'moto[server]'" >&2
  exit 1
fi

moto_port=$(free_port)
moto_setup_calls=3 # CreateUser, PutUserPolicy, CreateAccessKey below
INITIAL_NO_AUTH_ACTION_COUNT=$moto_setup_calls \
  moto_server -H 127.0.0.1 -p "$moto_port" >"$KEYROTD_TEST_DIR/moto.log" 2>&1 &
pids+=($!)
export KEYROTD_TEST_MOTO_URL="http://127.0.0.1:$moto_port"

# The dashboard API is not an AWS action, so polling it spends none of the unauthenticated calls.
wait_for moto python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=2)' \
  "$KEYROTD_TEST_MOTO_URL"

moto_admin=$(MOTO_URL="$KEYROTD_TEST_MOTO_URL" python3 - <<'PY'
import json, os
import boto3
iam = boto3.client("iam", endpoint_url=os.environ["MOTO_URL"], region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="keyrotd-test-admin")
iam.put_user_policy(UserName="keyrotd-test-admin", PolicyName="admin", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="keyrotd-test-admin")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
PY
) || { echo "FATAL: could not create the moto admin user; see $KEYROTD_TEST_DIR/moto.log" >&2; exit 1; }
read -r KEYROTD_TEST_AWS_ACCESS_KEY_ID KEYROTD_TEST_AWS_SECRET_ACCESS_KEY <<<"$moto_admin"
export KEYROTD_TEST_AWS_ACCESS_KEY_ID KEYROTD_TEST_AWS_SECRET_ACCESS_KEY
unset moto_admin moto_port moto_setup_calls
