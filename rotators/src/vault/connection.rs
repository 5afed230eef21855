//! Where Vault is and how keyrotd logs in: the inventory's `[vault]` table, and the `vault`
//! table of a Vault store or rotator, which overrides it field by field.

use std::path::PathBuf;
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use serde::Deserialize;

use super::calls::check_path;
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
    /// A PEM certificate keyrotd presents to Vault (TLS client authentication, Vault's `cert`
    /// auth or a listener that requires one); needs [`Self::client_key`].
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of [`Self::client_cert`]: a regular file (no symlink) that only its
    /// owner may read, at most 64 KiB.
    pub client_key: Option<PathBuf>,
    /// How long a value read through a `vault:` reference is reused (`"30s"`, the default;
    /// `"0s"` reads Vault every time). Read from the `[vault]` table only.
    #[serde(default, deserialize_with = "optional_duration")]
    pub reference_cache: Option<Duration>,
    /// The mounts that `vault:` references read as KV version 1 (every other mount is KV v2).
    pub reference_kv1_mounts: Option<Vec<String>>,
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
    /// AppRole: a role-id and a secret-id, both secret references. With `secret_id_wrapped`,
    /// the reference holds a response-wrapping token that is unwrapped once, at the first
    /// login; the secret-id it held is kept in memory for later logins (never on disk), so a
    /// restarted daemon needs a fresh wrapping token.
    Approle {
        /// The auth mount (`approle`).
        #[serde(default = "default_approle_mount")]
        mount: String,
        /// The role-id.
        role_id: SecretRef,
        /// The secret-id, or the wrapping token of one.
        secret_id: SecretRef,
        /// Whether `secret_id` holds a response-wrapping token.
        #[serde(default)]
        secret_id_wrapped: bool,
    },
    /// JWT login (`auth/MOUNT/login` with a role and a signed JWT): how a Kubernetes
    /// service-account token logs in. The reference is read again at each login, since the
    /// token file rotates.
    Jwt {
        /// The auth mount (`jwt`).
        #[serde(default = "default_jwt_mount")]
        mount: String,
        /// The role to log in as.
        role: String,
        /// The JWT, as a secret reference.
        jwt: SecretRef,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}

fn default_jwt_mount() -> String {
    "jwt".into()
}

/// The default for [`VaultConnection::reference_cache`].
pub const DEFAULT_REFERENCE_CACHE: Duration = Duration::from_secs(30);

/// The longest accepted [`VaultConnection::reference_cache`].
const MAX_REFERENCE_CACHE: Duration = Duration::from_secs(3600);

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
        take(&mut self.client_cert, &defaults.client_cert);
        take(&mut self.client_key, &defaults.client_key);
        take(&mut self.reference_cache, &defaults.reference_cache);
        take(
            &mut self.reference_kv1_mounts,
            &defaults.reference_kv1_mounts,
        );
    }

    /// Checks a connection after [`Self::fill`]: an address that is `https`, or `http` to
    /// loopback, and an auth method. The error starts with the field's name (`vault.address`).
    pub fn validate(&self) -> Result<(), String> {
        if self.address.is_none() {
            return Err("vault.address: missing (set it here or in the [vault] table)".into());
        }
        if self.auth.is_none() {
            return Err(
                "vault.auth: missing (set it here or in the [vault] table, e.g. \
                 { method = \"token\", token = \"env:VAULT_TOKEN\" })"
                    .into(),
            );
        }
        self.validate_fields()
    }

    /// Checks every field that is set, requiring none: the `[vault]` table where it is written,
    /// whether or not a credential uses it (one may set the address itself).
    pub fn validate_fields(&self) -> Result<(), String> {
        if let Some(address) = &self.address {
            check_address(address)?;
        }
        if let Some(namespace) = &self.namespace {
            check_path("vault.namespace", namespace, "a namespace path")?;
        }
        if let Some(auth) = &self.auth {
            auth.validate()?;
        }
        for (field, r) in self.secret_refs() {
            if matches!(r, SecretRef::Vault { .. }) {
                return Err(format!(
                    "{field}: a `vault:` reference cannot hold what logs in to Vault itself"
                ));
            }
        }
        if let Some(timeout) = self.request_timeout {
            timeouts::validate(timeouts::DEFAULT_CONNECT_TIMEOUT.min(timeout), timeout)
                .map_err(|e| format!("vault.request_timeout: {e}"))?;
        }
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => {
                return Err("vault.client_key: missing (client_cert needs it)".into())
            }
            (None, Some(_)) => {
                return Err("vault.client_cert: missing (client_key needs it)".into())
            }
            _ => {}
        }
        for (field, path) in [
            ("vault.ca_cert", &self.ca_cert),
            ("vault.client_cert", &self.client_cert),
            ("vault.client_key", &self.client_key),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(format!("{field}: must be an absolute path"));
            }
        }
        if self
            .reference_cache
            .is_some_and(|d| d > MAX_REFERENCE_CACHE)
        {
            return Err(
                "vault.reference_cache: at most 1h (a cached value outlives its rotation)".into(),
            );
        }
        for mount in self.reference_kv1_mounts.iter().flatten() {
            check_path("vault.reference_kv1_mounts", mount, "a mount name")?;
            if mount.contains('/') {
                return Err(format!(
                    "vault.reference_kv1_mounts: `{mount}`: a `vault:` reference's mount is one \
                     path segment"
                ));
            }
        }
        Ok(())
    }

    /// How long a `vault:` reference's value is reused.
    pub fn reference_cache(&self) -> Duration {
        self.reference_cache.unwrap_or(DEFAULT_REFERENCE_CACHE)
    }
}

impl VaultAuth {
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Token { .. } => Ok(()),
            Self::Approle { mount, .. } => check_path("vault.auth.mount", mount, "a mount path"),
            Self::Jwt { mount, role, .. } => {
                check_path("vault.auth.mount", mount, "a mount path")?;
                check_path("vault.auth.role", role, "a role name")?;
                if role.contains('/') {
                    return Err(format!("vault.auth.role: `{role}` must not contain `/`"));
                }
                Ok(())
            }
        }
    }
}

/// An `https` address, or `http` to loopback, that is a server's root.
fn check_address(address: &str) -> Result<(), String> {
    {
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
    }
    Ok(())
}

impl VaultConnection {
    /// The secret references the connection reads (for `keyrotd check`), with their fields.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretRef)> {
        match &self.auth {
            Some(VaultAuth::Token { token }) => vec![("vault.auth.token", token)],
            Some(VaultAuth::Approle {
                role_id, secret_id, ..
            }) => vec![
                ("vault.auth.role_id", role_id),
                ("vault.auth.secret_id", secret_id),
            ],
            Some(VaultAuth::Jwt { jwt, .. }) => vec![("vault.auth.jwt", jwt)],
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

    #[test]
    fn parses_approle_and_jwt_and_checks_the_new_fields() {
        let base = "address = \"https://v\"\n";
        let c = parse(&format!(
            "{base}auth = {{ method = \"approle\", role_id = \"env:R\", secret_id = \"env:S\", \
             secret_id_wrapped = true }}"
        ));
        c.validate().unwrap();
        let Some(VaultAuth::Approle {
            mount,
            secret_id_wrapped,
            ..
        }) = &c.auth
        else {
            panic!("{c:?}")
        };
        assert_eq!((mount.as_str(), *secret_id_wrapped), ("approle", true));
        assert_eq!(c.secret_refs().len(), 2);
        let c = parse(&format!(
            "{base}auth = {{ method = \"jwt\", role = \"keyrotd\", jwt = \"file:/t\" }}"
        ));
        c.validate().unwrap();
        assert!(matches!(&c.auth, Some(VaultAuth::Jwt { mount, .. }) if mount == "jwt"));
        assert_eq!(c.reference_cache(), DEFAULT_REFERENCE_CACHE);

        let jwt = "auth = { method = \"jwt\", role = \"keyrotd\", jwt = \"file:/t\" }";
        for (extra, expected) in [
            ("client_cert = \"/c.pem\"", "vault.client_key: missing"),
            ("client_key = \"/k.pem\"", "vault.client_cert: missing"),
            (
                "ca_cert = \"ca.pem\"",
                "vault.ca_cert: must be an absolute path",
            ),
            (
                "reference_cache = \"2h\"",
                "vault.reference_cache: at most 1h",
            ),
            (
                "reference_kv1_mounts = [\"a/b\"]",
                "vault.reference_kv1_mounts: ",
            ),
        ] {
            let err = parse(&format!("{base}{jwt}\n{extra}"))
                .validate()
                .unwrap_err();
            assert!(err.starts_with(expected), "{extra}: {err}");
        }
        for (auth, expected) in [
            (
                "{ method = \"jwt\", role = \"a/b\", jwt = \"file:/t\" }",
                "vault.auth.role: ",
            ),
            (
                "{ method = \"approle\", mount = \"../x\", role_id = \"env:R\", secret_id = \"env:S\" }",
                "vault.auth.mount: ",
            ),
            (
                "{ method = \"approle\", role_id = \"env:R\", secret_id = \"vault:secret/x#y\" }",
                "vault.auth.secret_id: a `vault:` reference",
            ),
        ] {
            let err = parse(&format!("{base}auth = {auth}")).validate().unwrap_err();
            assert!(err.starts_with(expected), "{auth}: {err}");
        }
        // The [vault] table alone may leave the address to the credentials.
        parse("namespace = \"team\"").validate_fields().unwrap();
        assert!(
            toml::from_str::<VaultConnection>("auth = { method = \"jwt\", jwt = \"env:J\" }")
                .is_err()
        );
    }
}
