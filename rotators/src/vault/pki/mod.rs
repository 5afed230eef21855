//! The `vault_pki_certificate` rotator: a TLS certificate and key from a PKI role, the old
//! certificate revoked after the grace period.
//!
//! - issue: `POST MOUNT/issue/ROLE` (common name, SANs, TTL; the key type is the role's), the
//!   key asked for as PKCS#8. The credential's secret is the private key (PEM); its public
//!   attributes are `certificate` and `ca_chain` (PEM, the chain as Vault returns it),
//!   `serial_number` and `not_after` (RFC 3339), from which keyrotd dates the credential's
//!   expiry. A `file` store with `format = "pem_bundle"` writes certificate, chain and key into
//!   one file, atomically.
//! - verify (offline, on the staged value): the key belongs to the certificate; the chain
//!   validates, for TLS server or client use, to `ca_cert` (without it: to the chain Vault
//!   returned, which proves only that the issuer signed it) and covers every configured name;
//!   the validity window is right (`check::validity`).
//! - revoke: `POST MOUNT/revoke` with the old serial (revoking twice is a success); an old
//!   certificate that has expired needs no revocation and is skipped.
//! - abandon: revokes the issued certificate. When a crash lost the issue answer, nothing is
//!   searched for: Vault cannot list certificates by requester, and the private key of that
//!   certificate existed only in the lost answer (Vault keeps no copy), so no one can use the
//!   certificate; it expires at its TTL.

mod check;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use self::check::Cert;
use super::calls::{check_mount, check_name, Call};
use super::connection::optional_duration;
use super::{VaultConnection, VaultSession};
use crate::timeouts::{self, Timeouts};
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Attrs, Credential, Permissions, ProviderError, Rotator, StepContext};

/// The attribute holding the certificate (PEM).
pub const CERTIFICATE: &str = "certificate";
/// The attribute holding the issuing CA chain (PEM certificates, one after the other).
pub const CA_CHAIN: &str = "ca_chain";
/// The attribute holding the serial number, as Vault writes it (`5e:19:...`).
pub const SERIAL: &str = "serial_number";
/// The attribute holding the certificate's notAfter, RFC 3339 (`2027-01-01T00:00:00Z`).
pub const NOT_AFTER: &str = "not_after";

/// Configuration of the `vault_pki_certificate` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiCertificateConfig {
    /// Where the PKI secrets engine is mounted.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The PKI role that issues the certificate (it decides the key type and size).
    pub role: String,
    /// The certificate's common name.
    pub common_name: String,
    /// More DNS names (subject alternative names).
    #[serde(default)]
    pub alt_names: Vec<String>,
    /// IP address SANs.
    #[serde(default)]
    pub ip_sans: Vec<String>,
    /// The certificate's lifetime (`"720h"`); by default the role's `ttl`. Verify checks that
    /// Vault did not shorten it.
    #[serde(default, deserialize_with = "optional_duration")]
    pub ttl: Option<Duration>,
    /// A PEM file of the CA(s) the chain must validate to: the root consumers trust.
    pub ca_cert: Option<PathBuf>,
    /// Overrides of the `[vault]` table, field by field.
    #[serde(default)]
    pub vault: VaultConnection,
    /// The longest one step may take (`"60s"`).
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

fn default_mount() -> String {
    "pki".into()
}

impl PkiCertificateConfig {
    /// Checks the configuration (after [`VaultConnection::fill`]); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_mount("mount", &self.mount)?;
        check_name("role", &self.role)?;
        if self.common_name.trim().is_empty() || self.common_name.contains(',') {
            return Err("common_name: must be one non-empty name".into());
        }
        let dns = |name: &str| {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            rustls_pki_types::DnsName::try_from(bare).is_ok() && !bare.contains('*')
        };
        if let Some(bad) = self.alt_names.iter().find(|n| !dns(n)) {
            return Err(format!("alt_names: `{bad}` is not a DNS name"));
        }
        if let Some(bad) = self
            .ip_sans
            .iter()
            .find(|ip| ip.parse::<std::net::IpAddr>().is_err())
        {
            return Err(format!("ip_sans: `{bad}` is not an IP address"));
        }
        if self.ttl.is_some_and(|t| t < Duration::from_secs(10)) {
            return Err("ttl: must be at least 10s".into());
        }
        if self.ca_cert.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err("ca_cert: must be an absolute path".into());
        }
        timeouts::validate(timeouts::DEFAULT_CONNECT_TIMEOUT, self.timeout)?;
        self.vault.validate()
    }

    /// The names the certificate must be valid for.
    fn names(&self) -> Vec<&str> {
        std::iter::once(self.common_name.as_str())
            .chain(self.alt_names.iter().map(String::as_str))
            .chain(self.ip_sans.iter().map(String::as_str))
            .collect()
    }
}

/// The `vault_pki_certificate` rotator.
pub struct PkiCertificateRotator {
    config: PkiCertificateConfig,
    session: Arc<VaultSession>,
}

impl PkiCertificateRotator {
    /// Builds the rotator from a configuration whose connection is filled in. Does not touch
    /// the network.
    pub fn new(config: PkiCertificateConfig) -> Result<Self, String> {
        config.validate()?;
        let session = VaultSession::shared(&config.vault)?;
        Ok(Self { config, session })
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::new(timeouts::DEFAULT_CONNECT_TIMEOUT, self.config.timeout)
    }

    /// `POST body` to `path` through keyrotd's session; `doing` names it in errors, with the
    /// path and the capability it needs.
    async fn write(&self, doing: &str, path: String, body: Value) -> Result<Value, ProviderError> {
        let what = format!("{doing} (update on {path})");
        self.session
            .call(&what, self.timeouts(), |client| {
                let call = Call::<Value>::write(path.clone(), body.clone());
                async move { vaultrs::api::exec_with_result(&*client, call).await }
            })
            .await
    }

    async fn revoke_serial(&self, serial: &str) -> Result<(), ProviderError> {
        let path = format!("{}/revoke", self.config.mount);
        self.write(
            &format!("revoke certificate {serial}"),
            path,
            json!({ "serial_number": serial }),
        )
        .await?;
        tracing::info!(mount = %self.config.mount, serial_number = serial, "revoked certificate");
        Ok(())
    }

    /// The trusted CAs: `ca_cert` read now (so a replaced file counts), else `chain`.
    fn anchors(&self, chain: &str) -> Result<Vec<Cert>, ProviderError> {
        let Some(path) = &self.config.ca_cert else {
            return check::certs("the CA chain", chain).map_err(ProviderError::permanent);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProviderError::io(format!("ca_cert {}", path.display()), &e))?;
        let anchors = check::certs(&format!("ca_cert {}", path.display()), &text)
            .map_err(ProviderError::permanent)?;
        if anchors.is_empty() {
            return Err(ProviderError::permanent(format!(
                "ca_cert {} holds no certificate",
                path.display()
            )));
        }
        Ok(anchors)
    }
}

fn serial_of(attrs: Option<&Attrs>) -> Option<&str> {
    attrs.and_then(|a| a.get(SERIAL)).map(String::as_str)
}

/// Vault's PEM text of one block, without the trailing newline, so that a store writing it
/// between other blocks reads back exactly the same text.
fn tidy_pem(pem: &str) -> String {
    pem.trim().to_owned()
}

#[async_trait]
impl Rotator for PkiCertificateRotator {
    fn kind(&self) -> &'static str {
        "vault_pki_certificate"
    }

    fn secret_field(&self) -> &str {
        "private_key"
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[SERIAL, NOT_AFTER, CERTIFICATE, CA_CHAIN]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    fn permissions(&self) -> Permissions {
        let mount = &self.config.mount;
        Permissions::none()
            .need(Permission::vault(
                format!("{mount}/issue/{}", self.config.role),
                &["update"],
                &["issue"],
            ))
            .need(Permission::vault(
                format!("{mount}/revoke"),
                &["update"],
                &["abandon", "revoke"],
            ))
            .note(format!(
                "{mount}/revoke can revoke any certificate of the mount, given its serial: Vault \
                 has no narrower path for it"
            ))
    }

    async fn issue(
        &self,
        _ctx: StepContext<'_>,
        _current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let c = &self.config;
        let mut body = json!({
            "common_name": c.common_name,
            "format": "pem",
            "private_key_format": "pkcs8",
        });
        if !c.alt_names.is_empty() {
            body["alt_names"] = c.alt_names.join(",").into();
        }
        if !c.ip_sans.is_empty() {
            body["ip_sans"] = c.ip_sans.join(",").into();
        }
        if let Some(ttl) = c.ttl {
            body["ttl"] = format!("{}s", ttl.as_secs()).into();
        }
        let path = format!("{}/issue/{}", c.mount, c.role);
        let data = self.write("issue a certificate", path, body).await?;
        let text = |field: &str| {
            data[field].as_str().map(tidy_pem).ok_or_else(|| {
                ProviderError::transient(format!(
                    "issue a certificate from role {}: Vault's answer has no {field}",
                    c.role
                ))
            })
        };
        let (key, certificate) = (text("private_key")?, text("certificate")?);
        let mut chain: Vec<String> = data["ca_chain"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(tidy_pem).collect())
            .unwrap_or_default();
        if chain.is_empty() {
            chain.push(text("issuing_ca")?);
        }
        // Dates and serial from the certificate itself, not from Vault's summary of it.
        let cert = Cert::from_pem("the issued certificate", &certificate)
            .map_err(ProviderError::permanent)?;
        let (serial, not_after) = (cert.serial(), cert.not_after());
        tracing::info!(mount = %c.mount, role = %c.role, serial_number = %serial,
            not_after = %humantime::format_rfc3339_seconds(not_after), "issued certificate");
        Ok(Credential {
            secret: SecretString::from(key),
            attrs: Attrs::from([
                (SERIAL.to_owned(), serial),
                (
                    NOT_AFTER.to_owned(),
                    humantime::format_rfc3339_seconds(not_after).to_string(),
                ),
                (CERTIFICATE.to_owned(), certificate),
                (CA_CHAIN.to_owned(), chain.join("\n")),
            ]),
        })
    }

    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let attr = |name: &str| {
            new.attrs.get(name).ok_or_else(|| {
                ProviderError::permanent(format!("the new certificate has no {name} attribute"))
            })
        };
        let bad = ProviderError::permanent;
        let cert = Cert::from_pem("the certificate", attr(CERTIFICATE)?).map_err(bad)?;
        let chain_pem = attr(CA_CHAIN)?;
        let chain = check::certs("the CA chain", chain_pem).map_err(bad)?;
        let anchors = self.anchors(chain_pem)?;
        let now = SystemTime::now();
        check::key_matches(new.secret.expose_secret(), &cert).map_err(bad)?;
        check::chain_validates(&cert, &chain, &anchors, &self.config.names(), now).map_err(bad)?;
        check::validity(&cert, now, self.config.ttl, ctx.started_at).map_err(bad)?;
        Ok(())
    }

    async fn abandon(
        &self,
        ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        let Some(serial) = serial_of(issued) else {
            // See the module's documentation: the lost certificate's key exists nowhere.
            tracing::info!(mount = %self.config.mount, "the issued certificate's serial is unknown \
                (lost in a crash); its private key was never stored, so it is left to expire");
            return Ok(());
        };
        let current = serial_of(current.map(|c| &c.attrs));
        if Some(serial) == current || Some(serial) == serial_of(ctx.old_attrs) {
            return Ok(());
        }
        self.revoke_serial(serial).await
    }

    async fn revoke(&self, _ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        let Some(serial) = serial_of(Some(old)) else {
            tracing::warn!(mount = %self.config.mount, "the replaced certificate has no \
                {SERIAL} attribute (keyrotd did not issue it): revoke it by hand");
            return Ok(());
        };
        let expired = old
            .get(NOT_AFTER)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t <= SystemTime::now());
        if expired {
            tracing::info!(
                serial_number = serial,
                "the replaced certificate has expired: nothing to revoke"
            );
            return Ok(());
        }
        self.revoke_serial(serial).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PkiCertificateConfig {
        toml::from_str(
            "role = \"web\"\ncommon_name = \"www.example.com\"\nvault = { address = \
             \"http://127.0.0.1:8200\", auth = { method = \"token\", token = \"env:T\" } }",
        )
        .unwrap()
    }

    #[test]
    fn validates_names_addresses_ttl_and_the_ca_path() {
        let mut ok = config();
        ok.alt_names = vec!["*.example.com".into(), "a.example.com".into()];
        ok.ip_sans = vec!["::1".into()];
        ok.validate().unwrap();
        assert_eq!(ok.mount, "pki");
        assert_eq!(
            ok.names(),
            ["www.example.com", "*.example.com", "a.example.com", "::1"]
        );
        type Spoil = fn(&mut PkiCertificateConfig);
        let cases: [(&str, Spoil); 8] = [
            ("alt_names: ", |c| c.alt_names = vec!["a b".into()]),
            ("alt_names: ", |c| c.alt_names = vec!["a.*.com".into()]),
            ("alt_names: ", |c| c.alt_names = vec![String::new()]),
            ("ip_sans: ", |c| c.ip_sans = vec!["10.0.0".into()]),
            ("ttl: ", |c| c.ttl = Some(Duration::from_secs(5))),
            ("ca_cert: ", |c| c.ca_cert = Some("root.pem".into())),
            ("role: ", |c| c.role = "a/b".into()),
            ("common_name: ", |c| c.common_name = "a,b".into()),
        ];
        for (field, spoil) in cases {
            let mut c = config();
            spoil(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.starts_with(field), "{field} {err}");
        }
    }
}
