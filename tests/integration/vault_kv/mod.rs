//! The `vault_kv2` and `vault_kv1` stores through the binary against OpenBao
//! (tests/backends/50-openbao.sh): full rotations with the `random` rotator, a reader of the
//! latest version, the exact round trips of a KV v2 rotation, a concurrent writer, OpenBao
//! unreachable, permission denied and kill -9 at every step boundary.
//!
//! keyrotd talks to OpenBao through [`proxy::Proxy`], which counts its requests and can drop
//! chosen ones; its token carries exactly the policy `keyrotd policy` prints (or that policy with
//! one capability removed). The tests inspect OpenBao directly, as root.

mod crash;
mod failures;
mod proxy;
mod rotation;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use keyrotd_test_support::openbao::{unique, OpenBao};
use serde_json::Value;

use crate::support::*;
use proxy::Proxy;

/// One secret holding `p0` (beside `host`), and an inventory rotating it into that secret.
struct Fixture {
    bao: OpenBao,
    proxy: Proxy,
    dir: tempfile::TempDir,
    port: u16,
    /// 1 or 2.
    kv: u8,
    mount: String,
    path: String,
    p0: String,
    /// The token keyrotd was given last, for the leak scan.
    token: std::cell::RefCell<String>,
}

impl Fixture {
    /// The secret and the inventory; keyrotd's token carries the printed policy.
    fn new(kv: u8, tag: &str, store_extra: &str, extra: &str) -> Self {
        let fx = Self::without_token(kv, tag, store_extra, extra);
        let hcl = fx.printed_policy();
        fx.use_policy(&hcl);
        fx
    }

    fn without_token(kv: u8, tag: &str, store_extra: &str, extra: &str) -> Self {
        let bao = OpenBao::shared();
        let mount = bao.kv_mount(kv);
        let path = format!("keyrotd/{}", unique(tag));
        let p0 = format!("initial-{}-{}", unique("p0"), unique("x"));
        bao.bao(&[
            "kv",
            "put",
            &format!("-mount={mount}"),
            &path,
            &format!("password={p0}"),
            "host=db.internal",
        ]);
        let proxy = Proxy::start(&bao.addr);
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token_file = dir.path().join("token");
        let text = format!(
            r#"[daemon]
state = "sqlite:state/keyrotd.db"
listen = "127.0.0.1:{port}"

[vault]
address = "{url}"
auth = {{ method = "token", token = "file:{token}" }}
request_timeout = "5s"

[[credential]]
id = "app"
rotator = {{ kind = "random", length = 40 }}
store = {{ kind = "vault_kv{kv}", mount = "{mount}", path = "{path}"{store_extra} }}
rotate_every = "1h"
max_age = "2h"
grace = "0s"
retry = {{ max_attempts = 30, backoff = "1s", max_backoff = "2s" }}
{extra}
"#,
            url = proxy.url,
            token = token_file.display(),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self {
            bao,
            proxy,
            dir,
            port,
            kv,
            mount,
            path,
            p0,
            token: Default::default(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The HCL `keyrotd policy app` prints.
    fn printed_policy(&self) -> String {
        let out = self.cli(&["policy", "app", "--json"]);
        assert!(out.status.success(), "policy: {}", text(&out.stderr));
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let policy = if printed.is_array() {
            &printed[0]
        } else {
            &printed
        };
        policy["vault_policy"]
            .as_str()
            .unwrap_or_else(|| panic!("no vault_policy in {printed}"))
            .to_owned()
    }

    /// Gives keyrotd a new token carrying exactly `hcl`.
    fn use_policy(&self, hcl: &str) -> String {
        let token = self.bao.token_with_policy(&unique("keyrotd-kv"), hcl, "1h");
        let file = self.dir.path().join("token");
        std::fs::write(&file, &token).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.token.replace(token.clone());
        token
    }

    /// Runs a `keyrotd` command to completion; its stderr and stdout are kept for the leak scan.
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_at("trace", args)
    }

    /// [`Self::cli`] logging at `level` (the leak scans cover what each level shows).
    fn cli_at(&self, level: &str, args: &[&str]) -> Output {
        let out = keyrotd()
            .env("KEYROTD_LOG", level)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .output()
            .expect("spawn keyrotd");
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        std::fs::write(self.dir.path().join(format!("cli-{n}.log")), &out.stderr).unwrap();
        std::fs::write(self.dir.path().join(format!("cli-{n}.out")), &out.stdout).unwrap();
        out
    }

    fn rotate(&self) -> Output {
        self.cli(&["rotate", "app"])
    }

    /// `keyrotd rotate app` hanging at the failpoint `point`.
    fn rotate_until(&self, point: &str) -> Child {
        let log = self
            .dir
            .path()
            .join(format!("crashed-{}.log", point.replace(':', "-")));
        let mut child = keyrotd()
            .arg("--config")
            .arg(self.config())
            .args(["rotate", "app"])
            .env("KEYROTD_FAILPOINT", point)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let reached = wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("failpoint {point} reached"))
        });
        if !reached {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{point}: not reached:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        child
    }

    fn start(&self) -> Daemon {
        Daemon::start(
            &self.config(),
            self.port,
            &self.dir.path().join("daemon.log"),
            &[],
        )
    }

    fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    fn history(&self) -> String {
        text(&self.cli(&["history", "app"]).stdout)
    }

    /// `GET /v1/{api}` as root, straight to OpenBao: the status and the JSON answer.
    fn get(&self, api: &str) -> (u16, Value) {
        vault_get(&self.bao.addr, self.bao.root_token(), api)
    }

    /// The object at `PATH` (or a sibling `PATH{suffix}`) and its KV v2 version (0 on KV v1);
    /// `None` when there is none.
    fn read(&self, suffix: &str) -> Option<(serde_json::Map<String, Value>, u64)> {
        let api = match self.kv {
            2 => format!("{}/data/{}{suffix}", self.mount, self.path),
            _ => format!("{}/{}{suffix}", self.mount, self.path),
        };
        let (status, body) = self.get(&api);
        if status == 404 {
            return None;
        }
        assert_eq!(status, 200, "{api}: {body}");
        let (data, version) = match self.kv {
            2 => (
                &body["data"]["data"],
                body["data"]["metadata"]["version"].as_u64().unwrap(),
            ),
            _ => (&body["data"], 0),
        };
        Some((data.as_object().unwrap().clone(), version))
    }

    /// The password consumers read now, and the rotation that wrote it.
    fn latest(&self) -> (String, Option<String>, u64) {
        let (object, version) = self.read("").expect("the secret exists");
        (
            object["password"].as_str().unwrap().to_owned(),
            object
                .get("keyrotd_rotation")
                .and_then(Value::as_str)
                .map(str::to_owned),
            version,
        )
    }

    /// The KV v2 secret's versions that still hold data.
    fn live_versions(&self) -> Vec<u64> {
        let (_, body) = self.get(&format!("{}/metadata/{}", self.mount, self.path));
        let mut live: Vec<u64> = body["data"]["versions"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["destroyed"] == false)
            .map(|(n, _)| n.parse().unwrap())
            .collect();
        live.sort_unstable();
        live
    }

    /// Waits for the rotation to be done once, as `keyrotd run` finishes it.
    fn wait_done(&self, daemon: &Daemon, done: usize) {
        let finished = wait_until(Duration::from_secs(40), || {
            self.history().matches("  app  done  ").count() == done
                && self.status()["state"] == "idle"
        });
        assert!(
            finished,
            "not finished: {}\n{}\n{}",
            self.status(),
            self.history(),
            daemon.log_text()
        );
    }

    /// No password in `values`, no P0 and not the token in logs (at trace level), CLI output,
    /// state files, status, history or `metrics`.
    fn assert_no_secret_leaked(&self, values: &[String], metrics: Option<&str>) {
        let mut everything = all_bytes(self.dir.path(), &[self.dir.path().join("token")]);
        everything.extend(self.status().to_string().as_bytes());
        everything.extend(self.history().as_bytes());
        everything.extend(metrics.unwrap_or_default().as_bytes());
        assert!(
            everything.len() > 2_000,
            "logs, state and output were scanned"
        );
        assert!(
            self.dir.path().join("state").exists(),
            "the state files are scanned"
        );
        let mut secrets = values.to_vec();
        secrets.push(self.p0.clone());
        secrets.push(self.token.borrow().clone());
        for secret in &secrets {
            for encoded in encodings(secret) {
                assert!(
                    !contains(&everything, &encoded),
                    "a secret leaked (as {encoded:.6}…)"
                );
            }
        }
    }
}

/// A minimal `GET` with a token, so a test needs no HTTP client crate.
fn vault_get(addr: &str, token: &str, api: &str) -> (u16, Value) {
    let host = addr.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "GET /v1/{api} HTTP/1.0\r\nHost: {host}\r\nX-Vault-Token: {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Go answers HTTP/1.0 without chunking.
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
