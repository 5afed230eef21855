//! Where Vault is and how keyrotd logs in: the inventory's `[vault]` table, and the `vault`
//! table of a Vault store or rotator, which overrides it field by field.

use std::path::PathBuf;
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use serde::Deserialize;

use crate::timeouts;

/// A Vault connection as written: every field optional, so that a credential's `vault` table
/// can override the inventory's `[vault]` defaults one field at a time ([`Self::fill`]).
/// [`Self::validate`] then requires an address and an auth method.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConnection {
    /// The server, `https://vault.example:8200` (plain `http://` only to loopback).
    pub address: Option<String>,
    /// The Vault Enterprise / OpenBao namespace every call is made in.
    pub namespace: Option<String>,
    /// How keyrotd logs in.
    pub auth: Option<VaultAuth>,
    /// A PEM bundle of the CAs that sign the server's certificate (else the system's roots).
    pub ca_cert: Option<PathBuf>,
    /// The longest one HTTP request to Vault may take (`"30s"`); a step's own `timeout` bounds
    /// the step as a whole.
    #[serde(default, deserialize_with = "optional_duration")]
    pub request_timeout: Option<Duration>,
}

/// How keyrotd logs in to Vault (`auth = { method = "token", token = "env:VAULT_TOKEN" }`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum VaultAuth {
    /// A token read from a secret reference (a file that Vault Agent refreshes, a systemd
    /// credential). Read again whenever Vault refuses it as expired or revoked.
    Token {
        /// The token, as a secret reference.
        token: SecretRef,
    },
}

/// The default for [`VaultConnection::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl VaultConnection {
    /// Takes every field this table leaves unset from `defaults` (the `[vault]` table).
    pub fn fill(&mut self, defaults: &VaultConnection) {
        fn take<T: Clone>(field: &mut Option<T>, default: &Option<T>) {
            if field.is_none() {
                field.clone_from(default);
            }
        }
        take(&mut self.address, &defaults.address);
        take(&mut self.namespace, &defaults.namespace);
        take(&mut self.auth, &defaults.auth);
        take(&mut self.ca_cert, &defaults.ca_cert);
        take(&mut self.request_timeout, &defaults.request_timeout);
    }

    /// Checks a connection after [`Self::fill`]: an address that is `https`, or `http` to
    /// loopback, and an auth method. The error starts with the field's name (`vault.address`).
    pub fn validate(&self) -> Result<(), String> {
        let Some(address) = &self.address else {
            return Err("vault.address: missing (set it here or in the [vault] table)".into());
        };
        let url = url::Url::parse(address)
            .map_err(|e| format!("vault.address: `{address}` is not an absolute URL ({e})"))?;
        match url.scheme() {
            "https" => {}
            "http" if url.host_str().is_some_and(keyrotd_plugin::is_loopback_host) => {}
            "http" => {
                return Err(format!(
                    "vault.address: `{address}` must use https (plain http is only allowed to \
                     loopback addresses)"
                ))
            }
            other => return Err(format!("vault.address: unsupported scheme `{other}`")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("vault.address: must not carry a user name or password".into());
        }
        if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
            return Err(format!(
                "vault.address: `{address}` must be the server's root (no path, query or fragment)"
            ));
        }
        if let Some(namespace) = &self.namespace {
            let valid = !namespace.is_empty()
                && namespace.split('/').all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                        && part != "."
                        && part != ".."
                });
            if !valid {
                return Err(format!(
                    "vault.namespace: `{namespace}` is not a namespace path (letters, digits, \
                     `-_.`, parts separated by `/`)"
                ));
            }
        }
        if self.auth.is_none() {
            return Err(
                "vault.auth: missing (set it here or in the [vault] table, e.g. \
                 { method = \"token\", token = \"env:VAULT_TOKEN\" })"
                    .into(),
            );
        }
        if let Some(timeout) = self.request_timeout {
            timeouts::validate(timeouts::DEFAULT_CONNECT_TIMEOUT.min(timeout), timeout)
                .map_err(|e| format!("vault.request_timeout: {e}"))?;
        }
        Ok(())
    }

    /// The secret references the connection reads (for `keyrotd check`), with their fields.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretRef)> {
        match &self.auth {
            Some(VaultAuth::Token { token }) => vec![("vault.auth.token", token)],
            None => vec![],
        }
    }

    /// The request timeout in force.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }
}

pub(crate) fn optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    timeouts::duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> VaultConnection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_credential_overrides_the_defaults_field_by_field() {
        let defaults = parse(
            "address = \"https://vault.example:8200\"\nnamespace = \"team\"\n\
             auth = { method = \"token\", token = \"env:VAULT_TOKEN\" }",
        );
        let mut own = parse("namespace = \"other\"");
        own.fill(&defaults);
        assert_eq!(own.address.as_deref(), Some("https://vault.example:8200"));
        assert_eq!(own.namespace.as_deref(), Some("other"));
        assert!(own.auth.is_some());
        own.validate().unwrap();
    }

    #[test]
    fn refuses_plain_http_off_loopback_and_odd_addresses() {
        let auth = "auth = { method = \"token\", token = \"env:T\" }";
        for (address, expected) in [
            ("http://vault.example:8200", "must use https"),
            ("ftp://127.0.0.1", "unsupported scheme"),
            ("vault:8200", "unsupported scheme"),
            ("https://u:p@vault.example", "user name or password"),
            ("https://vault.example/v1/secret", "the server's root"),
            ("not a url", "not an absolute URL"),
        ] {
            let c = parse(&format!("address = \"{address}\"\n{auth}"));
            let err = c.validate().unwrap_err();
            assert!(err.starts_with("vault.address: "), "{err}");
            assert!(err.contains(expected), "{address}: {err}");
        }
        for address in [
            "http://127.0.0.1:8200",
            "http://[::1]:8200",
            "http://localhost",
        ] {
            parse(&format!("address = \"{address}\"\n{auth}"))
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn requires_an_address_and_an_auth_method_and_a_sane_namespace() {
        let err = parse("").validate().unwrap_err();
        assert!(err.starts_with("vault.address: missing"), "{err}");
        let err = parse("address = \"https://v\"").validate().unwrap_err();
        assert!(err.starts_with("vault.auth: missing"), "{err}");
        let auth = "address = \"https://v\"\nauth = { method = \"token\", token = \"env:T\" }";
        for namespace in ["", "a//b", "../x", "a b"] {
            let err = parse(&format!("{auth}\nnamespace = \"{namespace}\""))
                .validate()
                .unwrap_err();
            assert!(err.starts_with("vault.namespace: "), "{err}");
        }
        assert!(toml::from_str::<VaultConnection>("auth = { method = \"root\" }").is_err());
        assert!(toml::from_str::<VaultConnection>("request_timeout = \"soon\"").is_err());
    }
}
