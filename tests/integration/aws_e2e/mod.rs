//! The AWS plugins end to end through the real `keyrotd` binary, against the moto server that
//! tests/backends/20-moto.sh starts with IAM enforced (so a deleted key really is refused).
//!
//! Each test makes its own IAM user with one access key (`K0`) and its own Secrets Manager secret
//! holding `{"AccessKeyId": K0, "SecretAccessKey": ...}` as `AWSCURRENT`, writes an inventory with
//! one `aws_iam_access_key` credential stored in that secret (field mode), and drives
//! `keyrotd rotate` / `keyrotd run` as an operator would, inspecting IAM and Secrets Manager with
//! the admin key behind the daemon's back. The daemon gets the admin key through the standard
//! AWS environment variables, like a production daemon would.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_iam::config::SharedCredentialsProvider;
use aws_sdk_sts::config::Credentials;
use support::*;

mod crash;
mod failures;
mod in_use;
mod policy;

const CURRENT: &str = "AWSCURRENT";
const PREVIOUS: &str = "AWSPREVIOUS";
const PENDING: &str = "AWSPENDING";

fn moto_url() -> String {
    backend_env("KEYROTD_TEST_MOTO_URL")
}

/// The admin key made by tests/backends/20-moto.sh.
fn admin_key() -> (String, String) {
    (
        backend_env("KEYROTD_TEST_AWS_ACCESS_KEY_ID"),
        backend_env("KEYROTD_TEST_AWS_SECRET_ACCESS_KEY"),
    )
}

/// The environment the daemon gets: the standard AWS chain, pointed at the admin key.
fn daemon_env() -> Vec<(&'static str, String)> {
    let (id, secret) = admin_key();
    vec![
        ("AWS_ACCESS_KEY_ID", id),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("KEYROTD_TEST_MARKER", "aws_e2e".into()),
    ]
}

/// An IAM access key as the test sees it (the secret is kept to call STS and to scan for leaks).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    id: String,
    secret: String,
}

fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("e2e-{tag}-{}-{:x}", std::process::id(), nanos % (1 << 48))
}

/// A tokio runtime and the admin's SDK configuration, to set up and inspect AWS synchronously.
struct Aws {
    rt: tokio::runtime::Runtime,
    config: SdkConfig,
}

impl Aws {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (id, secret) = admin_key();
        let loaded = rt.block_on(keyrotd_providers::aws::load_sdk_config(
            Some("us-east-1"),
            Some(&moto_url()),
            keyrotd_plugin::Timeouts::default(),
        ));
        // Explicit credentials: the test process does not touch its own environment.
        let config = loaded
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                id, secret, None, None, "aws-e2e",
            )))
            .build();
        Self { rt, config }
    }

    fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.config)
    }

    fn sm(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.config)
    }

    fn create_user(&self, user: &str) {
        self.rt
            .block_on(self.iam().create_user().user_name(user).send())
            .unwrap();
    }

    fn create_key(&self, user: &str) -> Key {
        let out = self
            .rt
            .block_on(self.iam().create_access_key().user_name(user).send())
            .unwrap();
        let key = out.access_key().unwrap();
        Key {
            id: key.access_key_id().to_owned(),
            secret: key.secret_access_key().to_owned(),
        }
    }

    fn delete_key(&self, user: &str, id: &str) {
        self.rt
            .block_on(
                self.iam()
                    .delete_access_key()
                    .user_name(user)
                    .access_key_id(id)
                    .send(),
            )
            .unwrap();
    }

    /// The user's access key ids.
    fn keys(&self, user: &str) -> BTreeSet<String> {
        let out = self
            .rt
            .block_on(self.iam().list_access_keys().user_name(user).send())
            .unwrap();
        out.access_key_metadata()
            .iter()
            .map(|k| k.access_key_id().unwrap().to_owned())
            .collect()
    }

    fn create_secret(&self, name: &str, value: &str) {
        self.rt
            .block_on(
                self.sm()
                    .create_secret()
                    .name(name)
                    .secret_string(value)
                    .send(),
            )
            .unwrap();
    }

    /// Version id to staging labels (versions without labels left out).
    fn labels(&self, secret_id: &str) -> BTreeMap<String, BTreeSet<String>> {
        let out = self
            .rt
            .block_on(self.sm().describe_secret().secret_id(secret_id).send())
            .unwrap();
        out.version_ids_to_stages()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(v, l)| (v, l.into_iter().collect()))
            .collect()
    }

    /// The version carrying `label`, if any.
    fn labelled(&self, secret_id: &str, label: &str) -> Option<String> {
        self.labels(secret_id)
            .into_iter()
            .find(|(_, l)| l.contains(label))
            .map(|(v, _)| v)
    }

    /// The key in one version of the secret (by label or version id).
    fn key_in(&self, secret_id: &str, stage: Option<&str>, version: Option<&str>) -> Key {
        let out = self
            .rt
            .block_on(
                self.sm()
                    .get_secret_value()
                    .secret_id(secret_id)
                    .set_version_stage(stage.map(str::to_owned))
                    .set_version_id(version.map(str::to_owned))
                    .send(),
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(out.secret_string().unwrap()).unwrap();
        Key {
            id: v["AccessKeyId"].as_str().unwrap().to_owned(),
            secret: v["SecretAccessKey"].as_str().unwrap().to_owned(),
        }
    }

    fn current(&self, secret_id: &str) -> Key {
        self.key_in(secret_id, Some(CURRENT), None)
    }

    /// Every key ever written to the secret, in any version (labelled or not).
    fn all_keys_in(&self, secret_id: &str) -> Vec<Key> {
        let out = self
            .rt
            .block_on(
                self.sm()
                    .list_secret_version_ids()
                    .secret_id(secret_id)
                    .include_deprecated(true)
                    .send(),
            )
            .unwrap();
        out.versions()
            .iter()
            .filter_map(|v| v.version_id())
            .map(|v| self.key_in(secret_id, None, Some(v)))
            .collect()
    }

    /// STS `GetCallerIdentity` signed with `key`: the caller's ARN, or the AWS error code.
    fn sts(&self, key: &Key) -> Result<String, String> {
        let credentials = Credentials::new(&key.id, &key.secret, None, None, "aws-e2e-sts");
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::config::Builder::from(&self.config)
                .credentials_provider(credentials)
                .build(),
        );
        match self.rt.block_on(sts.get_caller_identity().send()) {
            Ok(out) => Ok(out.arn().unwrap_or_default().to_owned()),
            Err(e) => Err(keyrotd_providers::aws::error_code(&e)
                .unwrap_or_else(|| format!("no AWS error code in {e:?}"))),
        }
    }
}

/// Lists a user's keys every 50 ms in the background and remembers the most it ever saw.
struct KeyWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl KeyWatch {
    fn start(user: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, user) = (stop.clone(), user.to_owned());
        let thread = std::thread::spawn(move || {
            let aws = Aws::new();
            let mut most = 0;
            while !flag.load(Ordering::Relaxed) {
                most = most.max(aws.keys(&user).len());
                std::thread::sleep(Duration::from_millis(50));
            }
            most
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The largest number of keys the user had at any observation.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// One IAM user with its initial key `k0`, one secret holding it, and an inventory rotating it.
struct Fixture {
    aws: Aws,
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    secret_id: String,
    k0: Key,
    k0_version: String,
}

impl Fixture {
    /// `user` and `secret` say whether the IAM user and the secret really exist.
    fn new(tag: &str, extra: &str) -> Self {
        Self::build(tag, extra, true, true)
    }

    fn build(tag: &str, extra: &str, user_exists: bool, secret_exists: bool) -> Self {
        let aws = Aws::new();
        let name = unique(tag);
        let (user, secret_id) = (name.clone(), format!("keyrotd-e2e/{name}"));
        let k0 = if user_exists {
            aws.create_user(&user);
            aws.create_key(&user)
        } else {
            // Not in IAM: only a value for the secret to hold.
            Key {
                id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret: format!("never-a-real-secret-{name}"),
            }
        };
        let mut k0_version = String::new();
        if secret_exists {
            let value = serde_json::json!({
                "AccessKeyId": k0.id, "SecretAccessKey": k0.secret, "region": "us-east-1",
            });
            aws.create_secret(&secret_id, &value.to_string());
            k0_version = aws.labelled(&secret_id, CURRENT).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = moto_url();
        let text = format!(
            r#"[daemon]
state = "sqlite:state/keyrotd.db"
listen = "127.0.0.1:{port}"

[[credential]]
id = "iam"
rotator = {{ kind = "aws_iam_access_key", user_name = "{user}", region = "us-east-1", endpoint_url = "{url}", verify_timeout = "2s" }}
store = {{ kind = "aws_secrets_manager", secret_id = "{secret_id}", field = "SecretAccessKey", region = "us-east-1", endpoint_url = "{url}" }}
rotate_every = "1h"
max_age = "2h"
retry = {{ max_attempts = 5, backoff = "1h", max_backoff = "2h" }}
{extra}
"#
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self {
            aws,
            dir,
            port,
            user,
            secret_id,
            k0,
            k0_version,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Runs a `keyrotd` command to completion with the daemon's AWS environment; its stderr is
    /// also kept in the fixture's directory, to be scanned for secrets.
    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = keyrotd();
        cmd.arg("--config").arg(self.config()).args(args);
        for (k, v) in daemon_env() {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("spawn keyrotd");
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        std::fs::write(self.dir.path().join(format!("cli-{n}.log")), &out.stderr).unwrap();
        std::fs::write(self.dir.path().join(format!("cli-{n}.out")), &out.stdout).unwrap();
        out
    }

    /// `keyrotd rotate iam` with a failpoint: returns the hung process once it reached the point.
    fn rotate_until(&self, point: &str) -> Child {
        let log = self.dir.path().join("crashed.log");
        let mut cmd = keyrotd();
        cmd.arg("--config")
            .arg(self.config())
            .args(["rotate", "iam"])
            .env("KEYROTD_FAILPOINT", point)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in daemon_env() {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let reached = wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("failpoint {point} reached"))
        });
        if !reached {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{point}: failpoint not reached:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        child
    }

    fn start(&self) -> Daemon {
        let env = daemon_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Daemon::start(
            &self.config(),
            self.port,
            &self.dir.path().join("daemon.log"),
            &env,
        )
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
    }

    fn history(&self) -> String {
        let out = self.cli(&["history", "iam"]);
        assert!(out.status.success(), "history: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn keys(&self) -> BTreeSet<String> {
        self.aws.keys(&self.user)
    }

    fn labels(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.aws.labels(&self.secret_id)
    }

    fn current(&self) -> Key {
        self.aws.current(&self.secret_id)
    }

    /// STS answers as this fixture's user for `key`.
    fn assert_works(&self, key: &Key, what: &str) {
        let arn = self
            .aws
            .sts(key)
            .unwrap_or_else(|code| panic!("{what}: STS refused {}: {code}", key.id));
        assert!(
            arn.ends_with(&format!(":user/{}", self.user)),
            "{what}: {arn}"
        );
    }

    fn assert_refused(&self, key: &Key, what: &str) {
        assert_eq!(
            self.aws.sts(key),
            Err("InvalidClientTokenId".to_owned()),
            "{what}: key {} must be refused",
            key.id
        );
    }

    /// Every secret access key this test has seen: K0 and whatever any version of the secret
    /// holds, plus `extra`. None may appear in logs, CLI output or the state files.
    fn assert_no_secret_leaked(&self, extra: &[&Key]) {
        let mut secrets: Vec<Key> = extra.iter().map(|k| (*k).clone()).collect();
        secrets.push(self.k0.clone());
        if !self.k0_version.is_empty() {
            secrets.extend(self.aws.all_keys_in(&self.secret_id));
        }
        let mut everything = all_bytes(self.dir.path(), &[]);
        everything.extend(self.status().to_string().as_bytes());
        everything.extend(self.history().as_bytes());
        let state = self.dir.path().join("state");
        if state.exists() {
            assert!(
                std::fs::read_dir(&state).unwrap().count() > 0,
                "the state files are scanned"
            );
        }
        assert!(
            everything.len() > 2_000,
            "logs, state and CLI output were scanned"
        );
        for key in &secrets {
            assert!(
                !contains(&everything, &key.secret),
                "the secret access key of {} leaked into logs, CLI output or state files",
                key.id
            );
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn full_iam_rotation_through_the_binary() {
    let fx = Fixture::new("full", "grace = \"3s\"");
    assert_eq!(fx.keys(), BTreeSet::from([fx.k0.id.clone()]));
    fx.assert_works(&fx.k0, "K0 before the rotation");
    let watch = KeyWatch::start(&fx.user);

    // Manual rotation: promoted, the old key still valid during the grace period.
    let out = fx.cli(&["rotate", "iam"]);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("promoted"),
        "{}",
        text(&out.stdout)
    );
    let k1 = fx.current();
    assert_ne!(k1.id, fx.k0.id);
    assert_eq!(fx.keys(), BTreeSet::from([fx.k0.id.clone(), k1.id.clone()]));
    fx.assert_works(&k1, "the new key");
    fx.assert_works(&fx.k0, "the old key during its grace period");
    let labels = fx.labels();
    let rotation = fx.aws.labelled(&fx.secret_id, CURRENT).unwrap();
    assert_eq!(labels.get(&rotation), Some(&set(&[CURRENT])), "{labels:?}");
    assert_eq!(
        labels.get(&fx.k0_version),
        Some(&set(&[PREVIOUS])),
        "{labels:?}"
    );
    assert_eq!(labels.len(), 2, "no AWSPENDING left: {labels:?}");
    assert_eq!(fx.status()["state"], "grace");
    assert!(fx.history().contains(&format!("{rotation}  iam  promoted")));

    // The daemon revokes the old key once the grace period is over.
    let mut daemon = fx.start();
    let revoked = wait_until(Duration::from_secs(20), || {
        fx.status()["state"] == "idle" && fx.keys().len() == 1
    });
    assert!(revoked, "{}\n{}", fx.status(), daemon.log_text());
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    assert!(watch.finish() <= 2, "the user never had more than two keys");

    assert_eq!(fx.keys(), BTreeSet::from([k1.id.clone()]));
    fx.assert_refused(&fx.k0, "the old key after revoke");
    fx.assert_works(&k1, "the new key after revoke");
    assert_eq!(fx.current(), k1);
    let labels = fx.labels();
    assert_eq!(labels.get(&rotation), Some(&set(&[CURRENT])), "{labels:?}");
    assert_eq!(
        labels.get(&fx.k0_version),
        Some(&set(&[PREVIOUS])),
        "{labels:?}"
    );
    assert!(labels.values().all(|l| !l.contains(PENDING)), "{labels:?}");
    let history = fx.history();
    assert!(
        history.contains(&format!("{rotation}  iam  done  trigger=manual")),
        "{history}"
    );
    for step in ["issue", "stage", "activate", "verify", "promote", "revoke"] {
        assert!(
            history.contains(&format!("{step:<9} ok")),
            "{step}: {history}"
        );
    }
    // The rotation id is the version id in Secrets Manager, the key id is in the journal.
    let status = fx.status();
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    assert!(status["last_error"].is_null(), "{status}");
    fx.assert_no_secret_leaked(&[&k1]);
}
