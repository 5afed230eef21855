//! The OpenBao dev server that `tests/run.sh` starts (tests/backends/50-openbao.sh), driven as
//! its root through the `bao` CLI to set up mounts, policies and least-privilege tokens.
//! keyrotd itself is always handed a token with a narrow policy, never the root token.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::backend_env;

/// The shared OpenBao dev server.
pub struct OpenBao {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    root_token: String,
    bin: String,
}

impl OpenBao {
    /// The server of this test run (panics, never skips, without tests/run.sh).
    #[track_caller]
    pub fn shared() -> Self {
        Self {
            addr: backend_env("KEYROTD_TEST_VAULT_ADDR"),
            root_token: backend_env("KEYROTD_TEST_VAULT_ROOT_TOKEN"),
            bin: backend_env("KEYROTD_TEST_BAO"),
        }
    }

    /// The root token, for test set-up only.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The `bao` binary.
    pub fn bin(&self) -> &str {
        &self.bin
    }

    /// Runs `bao ARGS` as root and returns its stdout; panics with its stderr on failure.
    #[track_caller]
    pub fn bao(&self, args: &[&str]) -> String {
        self.bao_stdin(args, "")
    }

    /// [`Self::bao`] with `stdin` on its standard input (`bao policy write NAME -`).
    #[track_caller]
    pub fn bao_stdin(&self, args: &[&str], stdin: &str) -> String {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(stdin.as_bytes())
            .expect("write bao's stdin");
        let out = child.wait_with_output().expect("wait for bao");
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("bao prints UTF-8")
    }

    /// Runs `bao ARGS -format=json` (the flag goes right after the subcommand's words) and
    /// parses its output.
    #[track_caller]
    pub fn bao_json(&self, args: &[&str]) -> serde_json::Value {
        let split = args
            .iter()
            .position(|a| a.starts_with('-') || a.contains('='))
            .unwrap_or(args.len());
        let mut full: Vec<&str> = args[..split].to_vec();
        full.push("-format=json");
        full.extend(&args[split..]);
        serde_json::from_str(&self.bao(&full)).expect("bao printed JSON")
    }

    /// Writes the policy `name` with `hcl` and creates a token carrying only it (and not the
    /// `default` policy), valid for `ttl` (`"1h"`). Returns the token.
    #[track_caller]
    pub fn token_with_policy(&self, name: &str, hcl: &str, ttl: &str) -> String {
        self.bao_stdin(&["policy", "write", name, "-"], hcl);
        let ttl = format!("-ttl={ttl}");
        let policy = format!("-policy={name}");
        self.bao(&[
            "token",
            "create",
            "-no-default-policy",
            &policy,
            &ttl,
            "-field=token",
        ])
        .trim()
        .to_owned()
    }

    /// A KV mount of `version` (1 or 2): the dev server's own `secret/` for 2, a new mount under
    /// a unique path for 1.
    #[track_caller]
    pub fn kv_mount(&self, version: u8) -> String {
        if version == 2 {
            return "secret".to_owned();
        }
        let mount = unique("kv1");
        let path = format!("-path={mount}");
        self.bao(&["secrets", "enable", &path, "-version=1", "kv"]);
        mount
    }
}

/// A name no other test of this run uses (`prefix-1a2b3c4d`), for mounts, roles and policies.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// An RSA key made with openssl for JWT login tests: OpenBao's `jwt` auth trusts its public half
/// ([`OpenBao::jwt_role`]) and [`Self::sign`] makes RS256 JWTs with it.
pub struct JwtKey {
    key: std::path::PathBuf,
    public_pem: String,
}

impl JwtKey {
    /// A new 2048-bit key, written to `dir/jwt-key.pem`.
    #[track_caller]
    pub fn new(dir: &std::path::Path) -> Self {
        let key = dir.join("jwt-key.pem");
        openssl(&["genrsa", "-out", &key.display().to_string(), "2048"], b"");
        let public = openssl(&["rsa", "-in", &key.display().to_string(), "-pubout"], b"");
        Self {
            key,
            public_pem: String::from_utf8(public).expect("a PEM public key"),
        }
    }

    /// An RS256 JWT for subject `sub` and audience `aud`, valid for ten minutes.
    #[track_caller]
    pub fn sign(&self, sub: &str, aud: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let header = base64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "sub": sub, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + 600
        });
        let input = format!("{header}.{}", base64url(claims.to_string().as_bytes()));
        let key = self.key.display().to_string();
        let signature = openssl(&["dgst", "-sha256", "-sign", &key], input.as_bytes());
        format!("{input}.{}", base64url(&signature))
    }
}

impl OpenBao {
    /// Enables a `jwt` auth mount that trusts `key`, with a role for subject-any JWTs of
    /// audience `keyrotd` whose tokens carry `policy` and `default`. Returns (mount, role).
    #[track_caller]
    pub fn jwt_role(&self, key: &JwtKey, policy: &str) -> (String, String) {
        let mount = unique("jwt");
        let role = unique("keyrotd");
        self.bao(&["auth", "enable", &format!("-path={mount}"), "jwt"]);
        self.bao(&[
            "write",
            &format!("auth/{mount}/config"),
            &format!("jwt_validation_pubkeys={}", key.public_pem),
        ]);
        self.bao(&[
            "write",
            &format!("auth/{mount}/role/{role}"),
            "role_type=jwt",
            "bound_audiences=keyrotd",
            "user_claim=sub",
            &format!("token_policies={policy},default"),
            "token_ttl=1h",
        ]);
        (mount, role)
    }
}

/// Runs `openssl ARGS` with `stdin` and returns its stdout; panics with its stderr on failure.
#[track_caller]
fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write openssl's stdin");
    let out = child.wait_with_output().expect("wait for openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `data` as unpadded base64url (the JWT encoding).
fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64url_matches_the_rfc_4648_examples() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64url(raw.as_bytes()), encoded);
        }
        assert_eq!(super::base64url(&[0xfb, 0xff]), "-_8");
    }
}
