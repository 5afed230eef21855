//! The Vault credential rotators through the real `keyrotd` binary, against the OpenBao dev
//! server of tests/run.sh: each test enables its engine under a unique mount as root, and
//! keyrotd gets a token carrying exactly the policy `keyrotd policy` prints for the inventory.

mod approle;
mod pki;

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

use crate::support::openbao::{unique, OpenBao};
use crate::support::*;

/// A temporary directory with an inventory of one credential `id`, and keyrotd's token.
pub(super) struct Setup {
    pub dir: tempfile::TempDir,
    pub bao: OpenBao,
    pub id: &'static str,
    pub port: u16,
    /// keyrotd's least-privilege token.
    pub token: String,
}

impl Setup {
    /// Writes the inventory with the credential table `credential` (everything after
    /// `[[credential]]`, `{dir}` standing for the temporary directory), then gives keyrotd a
    /// token with the policy `keyrotd policy` prints for it.
    pub fn new(id: &'static str, credential: &str) -> Self {
        let bao = OpenBao::shared();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n\n\
             [vault]\naddress = \"{addr}\"\nauth = {{ method = \"token\", token = \"file:{token}\" }}\n\
             request_timeout = \"5s\"\n\n[[credential]]\nid = \"{id}\"\n{credential}",
            addr = bao.addr,
            token = dir.path().join("token").display(),
            credential = credential.replace("{dir}", &dir.path().display().to_string()),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let mut s = Self {
            dir,
            bao,
            id,
            port,
            token: String::new(),
        };
        let hcl = s.policy_hcl();
        s.set_policy(&hcl);
        s
    }

    /// The Vault policy `keyrotd policy ID --json` prints.
    pub fn policy_hcl(&self) -> String {
        let out = self.cli(&["policy", self.id, "--json"]);
        assert!(out.status.success(), "policy: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["vault_policy"]
            .as_str()
            .expect("a Vault policy")
            .to_owned()
    }

    /// Gives keyrotd a new token carrying only `hcl`.
    pub fn set_policy(&mut self, hcl: &str) {
        self.token = self.bao.token_with_policy(&unique("keyrotd"), hcl, "1h");
        std::fs::write(self.dir.path().join("token"), &self.token).unwrap();
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config(), args)
    }

    pub fn rotate(&self) -> Output {
        self.cli(&["rotate", self.id])
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    pub fn history(&self) -> String {
        String::from_utf8_lossy(&self.cli(&["history", self.id]).stdout).into_owned()
    }

    /// None of `secrets`, keyrotd's token or the root token is in the logs `extra`, the state
    /// database, status or history (`except`: the store's own files).
    pub fn assert_no_leak(&self, secrets: &[String], except: &[PathBuf], extra: &[String]) {
        let mut except = except.to_vec();
        except.push(self.path("token"));
        let mut everything = all_bytes(self.dir.path(), &except);
        everything.extend(self.history().as_bytes());
        everything.extend(self.status().to_string().as_bytes());
        for e in extra {
            everything.extend(e.as_bytes());
        }
        assert!(self.path("state/keyrotd.db").exists());
        assert!(!secrets.is_empty());
        let tokens = [self.token.clone(), self.bao.root_token().to_owned()];
        for secret in secrets.iter().chain(&tokens) {
            for encoded in encodings(secret.trim()) {
                assert!(
                    !contains(&everything, &encoded),
                    "a secret leaked into logs, state, status or history"
                );
            }
        }
    }
}

pub(super) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last `error:` line of a failed command.
pub(super) fn error_line(out: &Output) -> String {
    let err = stderr(out);
    err.lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("an error line in:\n{err}"))
        .to_owned()
}
