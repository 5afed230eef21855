//! Logging in to Vault and the lifetime of the token a login gives: the three auth methods of
//! [`VaultAuth`], the client they produce (address, namespace, TLS, every setting explicit), and
//! [`Lifetime`], which says when the session must renew the token or log in again.
//!
//! *Invariants:* no token, secret-id, wrapping token, JWT or key ever appears in an error or a
//! log line (errors name the reference or the file instead); a response-wrapped secret-id is
//! unwrapped once, and what it held stays in memory ([`Unwrapped`]), never on disk.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use keyrotd_plugin::reference::{SecretRef, MAX_SECRET_BYTES};
use keyrotd_plugin::{ProviderError, Timeouts};
use secrecy::{ExposeSecret, SecretString};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::connection::{VaultAuth, VaultConnection};
use super::error::classify;
use crate::resolve::Resolve;

/// When a token must be renewed or replaced. Vault's TTLs are whole seconds; 0 is a token that
/// never expires (a root-like token), which is never renewed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lifetime {
    /// From when the session renews (or replaces) the token: 2/3 into its TTL.
    renew_at: Option<Instant>,
    /// When it expires; `None`: never, or not known.
    expires_at: Option<Instant>,
    /// Whether `renew-self` may still extend it: not for a non-renewable token, nor once a
    /// renewal came back shorter than the login's TTL (capped by the max TTL).
    renewable: bool,
    /// The TTL the login granted.
    ttl: Duration,
}

/// What the session must do before its next call.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing: the token is fresh.
    Nothing,
    /// `renew-self`.
    Renew,
    /// Log in again (the token cannot be renewed further, or expired).
    LogIn,
}

impl Lifetime {
    /// A token whose lifetime is not known (its `lookup-self` was refused): never renewed; a
    /// 403 for it leads to a new login.
    pub(super) fn unknown() -> Self {
        Self::new(Instant::now(), 0, false)
    }

    /// A token granted `ttl_secs` at `now`.
    pub(super) fn new(now: Instant, ttl_secs: u64, renewable: bool) -> Self {
        let ttl = Duration::from_secs(ttl_secs);
        if ttl.is_zero() {
            return Self {
                renew_at: None,
                expires_at: None,
                renewable: false,
                ttl,
            };
        }
        Self {
            // Huge TTLs overflow `Instant`: such a token is, in practice, never renewed.
            renew_at: now.checked_add(ttl / 3 * 2),
            expires_at: now.checked_add(ttl),
            renewable,
            ttl,
        }
    }

    /// The lifetime after a renewal at `now` that granted `granted_secs`: a grant shorter than
    /// the login's TTL means the max TTL capped it, so the next due point logs in again.
    pub(super) fn renewed(&self, now: Instant, granted_secs: u64, renewable: bool) -> Self {
        let capped = Duration::from_secs(granted_secs) < self.ttl;
        let mut next = Self::new(now, granted_secs, renewable && !capped);
        next.ttl = self.ttl;
        next
    }

    /// What is due at `now`.
    pub(super) fn due(&self, now: Instant) -> Due {
        match (self.renew_at, self.expires_at) {
            (Some(renew_at), _) if now < renew_at => Due::Nothing,
            (None, _) => Due::Nothing,
            (Some(_), Some(expires_at)) if now >= expires_at => Due::LogIn,
            _ if self.renewable => Due::Renew,
            _ => Due::LogIn,
        }
    }
}

/// A secret-id unwrapped from a response-wrapping token, kept for the session's later logins.
pub(super) struct Unwrapped {
    /// The wrapping token it came from, to tell a new one put in the reference from the used one.
    wrapping_token: SecretString,
    secret_id: SecretString,
}

/// Logs in with the connection's auth method. `unwrapped` keeps the secret-id of a wrapped
/// AppRole secret-id between logins.
pub(super) async fn log_in(
    connection: &VaultConnection,
    unwrapped: &mut Option<Unwrapped>,
    timeouts: Timeouts,
) -> Result<(VaultClient, Lifetime), ProviderError> {
    let Some(auth) = &connection.auth else {
        return Err(ProviderError::permanent("vault.auth: missing"));
    };
    match auth {
        VaultAuth::Token { token } => {
            let token = read(token, timeouts).await?;
            let client = build(connection, token.expose_secret())?;
            // The token's remaining TTL. Refused (a token without the `default` policy): its
            // lifetime stays unknown and a 403 for it is what leads to a new login.
            let lifetime = match vaultrs::token::lookup_self(&client).await {
                Ok(info) => Lifetime::new(Instant::now(), info.ttl, info.renewable),
                Err(ClientError::APIError { code: 403, .. }) => Lifetime::unknown(),
                Err(e) => return Err(classify("look up keyrotd's own Vault token", &e)),
            };
            Ok((client, lifetime))
        }
        VaultAuth::Approle {
            mount,
            role_id,
            secret_id,
            secret_id_wrapped,
        } => {
            let what = format!("Vault login (AppRole at auth/{mount})");
            let role_id = read(role_id, timeouts).await?;
            let client = build(connection, "")?;
            if !secret_id_wrapped {
                let secret_id = read(secret_id, timeouts).await?;
                let auth = vaultrs::auth::approle::login(
                    &client,
                    mount,
                    role_id.expose_secret(),
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| classify(&what, &e))?;
                return Ok(finish(client, &auth));
            }
            if let Some(kept) = unwrapped.as_ref() {
                let kept_login = vaultrs::auth::approle::login(
                    &client,
                    mount,
                    role_id.expose_secret(),
                    kept.secret_id.expose_secret(),
                )
                .await;
                match kept_login {
                    Ok(auth) => return Ok(finish(client, &auth)),
                    Err(ClientError::APIError { code, .. }) if code == 400 || code == 403 => {}
                    Err(e) => return Err(classify(&what, &e)),
                }
                // The kept secret-id is refused (expired, used up, destroyed): only a new
                // wrapping token in the reference can help.
                let current = read(secret_id, timeouts).await?;
                if current.expose_secret() == kept.wrapping_token.expose_secret() {
                    return Err(ProviderError::permanent(format!(
                        "{what}: Vault no longer accepts the secret-id unwrapped from \
                         `{secret_id}`, and that reference still holds the wrapping token \
                         already used: write a fresh response-wrapped secret-id there"
                    )));
                }
            }
            let wrapping_token = read(secret_id, timeouts).await?;
            let fresh = unwrap_secret_id(connection, secret_id, &wrapping_token).await?;
            *unwrapped = Some(Unwrapped {
                wrapping_token,
                secret_id: fresh,
            });
            let kept = unwrapped.as_ref().map(|u| &u.secret_id);
            let auth = vaultrs::auth::approle::login(
                &client,
                mount,
                role_id.expose_secret(),
                kept.map(ExposeSecret::expose_secret).unwrap_or_default(),
            )
            .await
            .map_err(|e| classify(&what, &e))?;
            Ok(finish(client, &auth))
        }
        VaultAuth::Jwt { mount, role, jwt } => {
            let what = format!("Vault login (JWT role `{role}` at auth/{mount})");
            let jwt = read(jwt, timeouts).await?;
            let client = build(connection, "")?;
            let auth =
                vaultrs::auth::oidc::login(&client, mount, jwt.expose_secret(), Some(role.clone()))
                    .await
                    .map_err(|e| classify(&what, &e))?;
            Ok(finish(client, &auth))
        }
    }
}

/// Puts the login's token in the client and reads its lifetime.
fn finish(mut client: VaultClient, auth: &vaultrs::api::AuthInfo) -> (VaultClient, Lifetime) {
    client.set_token(&auth.client_token);
    let lifetime = Lifetime::new(Instant::now(), auth.lease_duration, auth.renewable);
    tracing::debug!(
        ttl_seconds = auth.lease_duration,
        renewable = auth.renewable,
        "logged in to Vault"
    );
    (client, lifetime)
}

/// Unwraps the response-wrapping token read from `reference` and returns the secret-id it held.
async fn unwrap_secret_id(
    connection: &VaultConnection,
    reference: &SecretRef,
    wrapping_token: &SecretString,
) -> Result<SecretString, ProviderError> {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        secret_id: String,
    }
    let client = build(connection, wrapping_token.expose_secret())?;
    match vaultrs::sys::wrapping::unwrap::<Wrapped>(&client, None).await {
        Ok(wrapped) => {
            tracing::info!(
                reference = %reference,
                "unwrapped the AppRole secret-id; it is kept in memory only: a restarted \
                 keyrotd needs a fresh wrapping token"
            );
            Ok(SecretString::from(wrapped.secret_id))
        }
        Err(ClientError::APIError { code, .. }) if code == 400 || code == 403 => {
            Err(ProviderError::permanent(format!(
                "Vault login (AppRole): the response-wrapping token in `{reference}` was \
                 already unwrapped or has expired (a wrapped secret-id unwraps exactly once; \
                 after a restart, write a fresh wrapping token there)"
            ))
            .with_code(code.to_string()))
        }
        Err(ClientError::JsonParseError { .. }) => Err(ProviderError::permanent(format!(
            "Vault login (AppRole): the token in `{reference}` does not wrap a secret-id"
        ))),
        Err(e) => Err(classify("unwrap the AppRole secret-id", &e)),
    }
}

/// Reads one of the auth method's secret references.
async fn read(reference: &SecretRef, timeouts: Timeouts) -> Result<SecretString, ProviderError> {
    reference
        .resolve_async(timeouts)
        .await
        .map_err(|e| ProviderError {
            class: e.class(),
            code: None,
            message: format!("Vault login: {e}"),
        })
}

/// A client for the connection carrying `token` (empty: none, to log in), every setting explicit
/// so that no `VAULT_*` variable of keyrotd's environment changes it.
pub(super) fn build(
    connection: &VaultConnection,
    token: &str,
) -> Result<VaultClient, ProviderError> {
    let c = connection;
    let identity = match (&c.client_cert, &c.client_key) {
        (Some(cert), Some(key)) => Some(identity(cert, key)?),
        _ => None,
    };
    let mut settings = VaultClientSettingsBuilder::default();
    settings
        // validate() parsed it: the builder's setter panics on an invalid URL.
        .address(c.address.as_deref().unwrap_or_default())
        .token(token)
        .verify(true)
        .identity(identity)
        .namespace(c.namespace.clone())
        .timeout(Some(c.request_timeout()))
        .ca_certs(c.ca_cert.iter().map(|p| p.display().to_string()).collect());
    let settings = settings
        .build()
        .map_err(|e| ProviderError::permanent(format!("Vault client settings: {e}")))?;
    VaultClient::new(settings).map_err(|e| classify("Vault client", &e))
}

/// The TLS client identity: the certificate and its private key, PEM. The key is read like a
/// `file:` reference and more strictly: a regular file, not a symlink, that neither its group
/// nor others may read.
fn identity(cert: &Path, key: &Path) -> Result<reqwest::Identity, ProviderError> {
    let fail = |path: &Path, why: String| {
        ProviderError::permanent(format!(
            "vault TLS client identity: `{}`: {why}",
            path.display()
        ))
    };
    let mut pem = std::fs::read(cert).map_err(|e| fail(cert, e.kind().to_string()))?;
    pem.push(b'\n');
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(key)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => fail(key, "is a symlink; name the key file itself".into()),
            _ => fail(key, e.kind().to_string()),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| fail(key, e.kind().to_string()))?;
    if !meta.is_file() {
        return Err(fail(key, "is not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(fail(
            key,
            format!(
                "is readable by its group or others (mode {:o}): chmod 600 it",
                meta.mode() & 0o777
            ),
        ));
    }
    let mut key_pem = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut key_pem)
        .map_err(|e| fail(key, e.kind().to_string()))?;
    if key_pem.len() as u64 > MAX_SECRET_BYTES {
        return Err(fail(key, "is too large for a private key".into()));
    }
    pem.extend_from_slice(&key_pem);
    key_pem.fill(0);
    let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
        ProviderError::permanent(format!(
            "vault TLS client identity: `{}` and `{}` are not a PEM certificate and its key",
            cert.display(),
            key.display()
        ))
    });
    pem.fill(0);
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_and_logs_in_again_once_capped_or_expired() {
        let t0 = Instant::now();
        let life = Lifetime::new(t0, 6, true);
        assert_eq!(life.due(t0), Due::Nothing);
        assert_eq!(life.due(t0 + Duration::from_secs(3)), Due::Nothing);
        assert_eq!(life.due(t0 + Duration::from_secs(4)), Due::Renew);
        assert_eq!(life.due(t0 + Duration::from_secs(6)), Due::LogIn);
        // A renewal granted less than the login's TTL: the max TTL is near.
        let capped = life.renewed(t0 + Duration::from_secs(4), 2, true);
        assert_eq!(capped.due(t0 + Duration::from_secs(5)), Due::Nothing);
        assert_eq!(capped.due(t0 + Duration::from_secs(6)), Due::LogIn);
        let full = life.renewed(t0 + Duration::from_secs(4), 6, true);
        assert_eq!(full.due(t0 + Duration::from_secs(8)), Due::Renew);
        assert_eq!(
            Lifetime::new(t0, 6, false).due(t0 + Duration::from_secs(5)),
            Due::LogIn
        );
    }

    #[test]
    fn zero_sub_second_and_huge_ttls_are_safe() {
        let t0 = Instant::now();
        let never = Lifetime::new(t0, 0, true);
        assert_eq!(never.due(t0 + Duration::from_secs(1 << 40)), Due::Nothing);
        let one = Lifetime::new(t0, 1, true);
        assert_eq!(one.due(t0), Due::Nothing);
        assert_eq!(one.due(t0 + Duration::from_millis(700)), Due::Renew);
        let huge = Lifetime::new(t0, u64::MAX, true);
        assert_eq!(huge.due(t0 + Duration::from_secs(1 << 40)), Due::Nothing);
        assert_eq!(Lifetime::unknown().due(t0), Due::Nothing);
    }

    #[test]
    fn a_client_key_others_can_read_or_a_symlink_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not a cert").unwrap();
        std::fs::write(&key, "PRIVATE-KEY-BYTES").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = identity(&cert, &key).unwrap_err().message;
        assert!(err.contains("readable by its group or others"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let err = identity(&cert, &link).unwrap_err().message;
        assert!(err.contains("is a symlink"), "{err}");
        let err = identity(&cert, &key).unwrap_err().message;
        assert!(err.contains("not a PEM certificate"), "{err}");
        assert!(!err.contains("PRIVATE-KEY-BYTES"), "{err}");
    }
}
