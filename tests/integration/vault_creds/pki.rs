//! `vault_pki_certificate` into a `file` store with `format = "pem_bundle"`: the bundle passes
//! `openssl verify` against the root, its key is the certificate's, the replaced certificate is
//! revoked (and in the CRL) after the grace period; a wrong configured CA fails verify, and the
//! issued certificate is revoked by the rollback; a short-lived certificate is due and stale by
//! its notAfter, not by `rotate_every` and `max_age`.

use std::process::Command;

use super::{error_line, stderr, Setup};
use crate::support::openbao::{unique, OpenBao};
use crate::support::{http_get, wait_until, Daemon};

const ID: &str = "web";

/// A root and an intermediate PKI mount, a role `web` on the intermediate, and the root's PEM
/// at `root.pem` of the returned directory's `dir`.
struct Pki {
    s: Setup,
    int: String,
}

/// Creates a root mount and returns (mount, root PEM).
fn root(bao: &OpenBao) -> (String, String) {
    let mount = unique("pki-root");
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "pki"]);
    bao.bao(&["secrets", "tune", "-max-lease-ttl=87600h", &mount]);
    let pem = bao.bao(&[
        "write",
        "-field=certificate",
        &format!("{mount}/root/generate/internal"),
        "common_name=keyrotd test root",
        "ttl=8760h",
    ]);
    (mount, pem)
}

impl Pki {
    fn new(ttl: &str) -> Self {
        let bao = OpenBao::shared();
        let (root_mount, root_pem) = root(&bao);
        let int = unique("pki-int");
        bao.bao(&["secrets", "enable", &format!("-path={int}"), "pki"]);
        bao.bao(&["secrets", "tune", "-max-lease-ttl=8760h", &int]);
        let csr = bao.bao(&[
            "write",
            "-field=csr",
            &format!("{int}/intermediate/generate/internal"),
            "common_name=keyrotd test intermediate",
        ]);
        let signed = bao.bao_stdin(
            &[
                "write",
                "-field=certificate",
                &format!("{root_mount}/root/sign-intermediate"),
                "csr=-",
                "format=pem_bundle",
                "ttl=4000h",
            ],
            &csr,
        );
        bao.bao_stdin(
            &[
                "write",
                &format!("{int}/intermediate/set-signed"),
                "certificate=-",
            ],
            &signed,
        );
        bao.bao(&[
            "write",
            &format!("{int}/roles/web"),
            "allowed_domains=example.test",
            "allow_subdomains=true",
            "allow_ip_sans=true",
            "max_ttl=72h",
        ]);
        let credential = format!(
            "store = {{ kind = \"file\", path = \"{{dir}}/tls/web.pem\", format = \"pem_bundle\" }}\n\
             rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n\n\
             [credential.rotator]\nkind = \"vault_pki_certificate\"\nmount = \"{int}\"\n\
             role = \"web\"\ncommon_name = \"www.example.test\"\nalt_names = [\"api.example.test\"]\n\
             ip_sans = [\"127.0.0.1\"]\nttl = \"{ttl}\"\nca_cert = \"{{dir}}/root.pem\"\n"
        );
        let s = Setup::new(ID, &credential);
        std::fs::write(s.path("root.pem"), root_pem).unwrap();
        Self { s, int }
    }

    fn bundle(&self) -> String {
        std::fs::read_to_string(self.s.path("tls/web.pem")).unwrap()
    }

    /// `openssl ARGS` in the test directory: (success, stdout + stderr).
    fn openssl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.s.dir.path())
            .output()
            .expect("openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The serial of the bundle's certificate, as Vault writes it.
    fn serial(&self) -> String {
        let (ok, text) = self.openssl(&["x509", "-in", "tls/web.pem", "-noout", "-serial"]);
        assert!(ok, "{text}");
        let hex = text.trim().trim_start_matches("serial=").to_lowercase();
        hex.as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn revoked(&self, serial: &str) -> bool {
        let v = self
            .s
            .bao
            .bao_json(&["read", &format!("{}/cert/{serial}", self.int)]);
        v["data"]["revocation_time"].as_i64().unwrap_or(0) > 0
    }

    /// The private key block of the bundle.
    fn key(&self) -> String {
        let bundle = self.bundle();
        let start = bundle.find("-----BEGIN PRIVATE KEY-----").expect("a key");
        bundle[start..].trim().to_owned()
    }
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_certificate_rotation_writes_a_bundle_that_validates_and_revokes_the_old_serial() {
    let p = Pki::new("24h");
    let first = p.s.rotate();
    assert!(first.status.success(), "{}", stderr(&first));
    let (ok, text) = p.openssl(&[
        "verify",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "tls/web.pem",
        "tls/web.pem",
    ]);
    assert!(ok && text.contains("tls/web.pem: OK"), "{text}");
    // The key in the bundle is the certificate's.
    let (_, from_cert) = p.openssl(&["x509", "-in", "tls/web.pem", "-noout", "-pubkey"]);
    let (_, from_key) = p.openssl(&["pkey", "-in", "tls/web.pem", "-pubout"]);
    assert!(from_cert.contains("PUBLIC KEY") && from_cert == from_key);
    let (_, names) = p.openssl(&[
        "x509",
        "-in",
        "tls/web.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        names.contains("api.example.test") && names.contains("127.0.0.1"),
        "{names}"
    );
    let serial1 = p.serial();
    let key1 = p.key();
    assert!(!p.revoked(&serial1));

    let second = p.s.rotate();
    assert!(second.status.success(), "{}", stderr(&second));
    let serial2 = p.serial();
    assert_ne!(serial1, serial2);
    assert!(
        p.revoked(&serial1),
        "the old certificate is revoked (grace 0s)"
    );
    assert!(!p.revoked(&serial2));
    let crl =
        p.s.bao
            .bao(&["read", "-field=certificate", &format!("{}/cert/crl", p.int)]);
    std::fs::write(p.s.path("crl.pem"), crl).unwrap();
    let (ok, crl_text) = p.openssl(&["crl", "-in", "crl.pem", "-noout", "-text"]);
    assert!(ok, "{crl_text}");
    assert!(
        crl_text.contains(&serial1.replace(':', "").to_uppercase()),
        "the old serial is in the CRL: {crl_text}"
    );
    let status = p.s.status();
    assert_eq!(status["state"], "idle", "{status}");
    let key2 = p.key();
    let files: Vec<_> = std::fs::read_dir(p.s.path("tls"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "web.pem and its sidecar: {files:?}");
    p.s.assert_no_leak(
        &[key1, key2],
        &[p.s.path("tls")],
        &[stderr(&first), stderr(&second)],
    );
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_chain_that_does_not_lead_to_the_configured_ca_fails_verify_and_is_revoked() {
    let p = Pki::new("24h");
    let (_, other_root) = root(&p.s.bao);
    std::fs::write(p.s.path("root.pem"), other_root).unwrap();
    let out = p.s.rotate();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    eprintln!("wrong CA as reported: {line}");
    for want in [
        "credential `web`",
        "step verify failed",
        "does not validate to the trusted CA",
    ] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    let serial = line
        .split("(serial ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the serial in the error")
        .to_owned();
    assert!(
        p.revoked(&serial),
        "the rollback revoked the issued certificate {serial}"
    );
    assert!(
        !p.s.path("tls/web.pem").exists(),
        "nothing reached consumers"
    );
    let listed = p.s.bao.bao(&["list", &format!("{}/certs", p.int)]);
    assert!(listed.contains(&serial), "{listed}");
}

/// An RFC 3339 instant of `status --json` as Unix seconds.
fn unix(v: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("a time: {v}")))
        .unwrap()
        .timestamp()
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_short_lived_certificate_is_due_and_stale_by_its_not_after() {
    // rotate_every = 1h and max_age = 2h, but the certificate lives 15 s.
    let p = Pki::new("15s");
    // Its notAfter is at most 15 s after this instant.
    let issued = std::time::Instant::now();
    let first = p.s.rotate();
    assert!(first.status.success(), "{}", stderr(&first));
    let serial1 = p.serial();
    let status = p.s.status();
    let max_age = status["max_age_seconds"].as_i64().unwrap();
    assert!(
        (5..=20).contains(&max_age),
        "max age ends at notAfter: {status}"
    );
    assert_eq!(status["stale"], false, "{status}");
    let lead = unix(&status["next_rotation"]) - unix(&status["last_rotation"]);
    assert!(
        (5..=15).contains(&lead),
        "due at two thirds of its life: {status}"
    );

    // The daemon exports that max age and renews the certificate before it expires.
    let daemon = Daemon::start(&p.s.config(), p.s.port, &p.s.path("daemon.log"), &[]);
    let metrics = http_get(p.s.port, "/metrics").unwrap().1;
    let exported: i64 = metrics
        .lines()
        .find(|l| l.starts_with("keyrotd_credential_max_age_seconds{credential=\"web\""))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("a max age series in:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(exported <= 20, "{exported}");
    let life_left = std::time::Duration::from_secs(15).saturating_sub(issued.elapsed());
    assert!(
        wait_until(life_left, || p.serial() != serial1),
        "renewed before its notAfter:\n{}",
        daemon.log_text()
    );
    drop(daemon);

    // Nothing renews it now: stale once its notAfter has passed.
    std::thread::sleep(std::time::Duration::from_secs(17));
    let status = p.s.status();
    assert_eq!(status["stale"], true, "{status}");
    p.s.assert_no_leak(&[p.key()], &[p.s.path("tls")], &[stderr(&first), metrics]);
}
