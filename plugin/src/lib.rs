//! The plugin API of keyrotd: what a provider implements and what the engine drives.
//!
//! A credential is rotated by two cooperating plugins:
//!
//! - a [`Rotator`] knows how to *issue* a new credential at its provider, make the provider
//!   accept it (*activate*), *verify* that it works, undo an unfinished rotation (*abandon*) and
//!   *revoke* an old credential;
//! - a [`Store`] knows where consumers read the credential: it *stages* a new value beside the
//!   current one, *promotes* it to current, *discards* it, and finally *releases* the previous one.
//!
//! Neither decides *when* anything happens: the daemon's engine drives them step by step and
//! journals every step. Every method must be idempotent: the engine re-runs a step after a crash,
//! and a step first checks whether its work is already done. The [`StepContext::rotation_id`] is the
//! idempotency key of a whole rotation.
//!
//! This crate holds only the contract, so that a plugin, the engine and their tests compile
//! without any provider's SDK:
//! - the traits and their types: [`Credential`], [`Attrs`], [`StepContext`], [`ProviderError`],
//!   [`ErrorClass`];
//! - [`reference`](mod@reference): the syntax of secret references (`env:`, `file:`, `credential:`,
//!   `aws-sm:`); reading them is the providers' job;
//! - [`timeouts`]: the deadlines every plugin that talks to a server is bounded by;
//! - [`backoff`]: the one retry delay policy of keyrotd;
//! - [`permissions`]: what a provider needs to be allowed to do (`keyrotd policy`);
//! - [`is_loopback_host`]: where plain-text protocols are allowed;
//! - [`usage`]: whether an old credential is still used, asked before revoking it.
//!
//! *Invariant:* no error message and no `Debug` output of these types carries secret material.

#![warn(missing_docs)]

pub mod backoff;
pub mod permissions;
pub mod reference;
pub mod timeouts;
pub mod usage;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;

pub use permissions::Permissions;
pub use timeouts::Timeouts;
pub use usage::{Usage, UsageReport};

/// A credential: its secret value plus public attributes that identify it.
///
/// Attributes are never secret (an access key id, a user name) and may be journaled and logged.
/// The secret lives only in memory, in the provider and in the store. `Debug` never prints it.
#[derive(Clone)]
pub struct Credential {
    /// The secret itself.
    pub secret: SecretString,
    /// Public attributes, written beside the secret in JSON stores.
    pub attrs: Attrs,
}

/// Public, non-secret attributes of a credential (key id, user name).
pub type Attrs = BTreeMap<String, String>;

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("secret", &"[redacted]")
            .field("attrs", &self.attrs)
            .finish()
    }
}

/// What a step knows about the rotation it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The inventory id of the credential being rotated.
    pub credential_id: &'a str,
    /// The rotation's id: unique per rotation and the idempotency token of every step.
    pub rotation_id: &'a str,
    /// Name of the secret's field when a store writes the credential as a JSON object
    /// (`password`, `SecretAccessKey`); chosen by the rotator.
    pub secret_field: &'a str,
    /// When the rotation started. A rotator that cleans up after a crash may only remove what was
    /// created at or after this instant (an IAM key made out of band before it is not an orphan).
    pub started_at: std::time::SystemTime,
    /// The public attributes of the credential the rotation replaces, as the engine recorded
    /// them when it started (none for a first rotation). Cleanup never removes what they name,
    /// even when the store cannot say what is current.
    pub old_attrs: Option<&'a Attrs>,
}

/// How the engine should react to a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying later: a timeout, throttling, a server error, a refused connection.
    Transient,
    /// Retrying will not help until someone changes something: access denied, not found, bad input.
    Permanent,
}

/// The code of a [`ProviderError::conflict`]; prefixed, so no provider's own code matches it.
pub const CONFLICT: &str = "keyrotd:conflict";

/// An error reported by a provider. The message says what the provider said; it must never
/// contain secret material, and every constructor in this crate takes care of that.
#[derive(Debug, thiserror::Error)]
#[error("{message}{}", code.as_deref().map(|c| format!(" (provider code {c})")).unwrap_or_default())]
pub struct ProviderError {
    /// Whether a retry may succeed.
    pub class: ErrorClass,
    /// The provider's own error code, when it has one (`LimitExceeded`, `28P01`, `429`).
    pub code: Option<String>,
    /// A human-readable explanation without secret material.
    pub message: String,
}

impl ProviderError {
    /// A transient failure that a later retry may fix.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            code: None,
            message: message.into(),
        }
    }

    /// A permanent failure that needs an operator.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            code: None,
            message: message.into(),
        }
    }

    /// A store's refusal to promote because someone else changed the current value since the
    /// stage (KV v2's `cas` mismatch): nothing was written, and no retry can succeed. The engine
    /// rolls such a rotation back, the one failure after verification that does; the next
    /// rotation starts from the other writer's value. Permanent, code [`CONFLICT`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::permanent(message).with_code(CONFLICT)
    }

    /// Whether this is a [`ProviderError::conflict`].
    pub fn is_conflict(&self) -> bool {
        self.class == ErrorClass::Permanent && self.code.as_deref() == Some(CONFLICT)
    }

    /// A call that got no answer within its deadline (a silent partition, a hung server):
    /// transient, since the same call may well work once the network heals. `what` names the
    /// call; the message ends with `no answer within 60s`.
    pub fn no_answer(what: impl fmt::Display, within: Duration) -> Self {
        Self::transient(format!(
            "{what}: no answer within {}",
            timeouts::describe(within)
        ))
        .with_code("timeout")
    }

    /// Attaches the provider's error code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Classifies a local I/O error, naming what was being done.
    pub fn io(what: impl fmt::Display, err: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let class = match err.kind() {
            NotFound | PermissionDenied | InvalidInput | InvalidData | ReadOnlyFilesystem => {
                ErrorClass::Permanent
            }
            _ => ErrorClass::Transient,
        };
        Self {
            class,
            code: err.raw_os_error().map(|c| c.to_string()),
            message: format!("{what}: {}", err.kind()),
        }
    }
}

/// The *how* of a rotation at the credential's provider.
#[async_trait]
pub trait Rotator: Send + Sync {
    /// The `kind` this rotator is configured with (`random`, `aws_iam_access_key`).
    fn kind(&self) -> &'static str;

    /// Name of the secret's field in JSON stores (see [`StepContext::secret_field`]).
    fn secret_field(&self) -> &str;

    /// The attributes this rotator puts on its credentials, all of them public (a key id, a user
    /// name). Values read back from a store may hold other members, which may be secret: the
    /// engine keeps only these names from them.
    fn public_attrs(&self) -> &'static [&'static str] {
        &[]
    }

    /// The longest one step may wait for this rotator (its `timeout` field). The engine abandons
    /// a step past it as a transient failure, whatever the rotator does itself.
    fn timeout(&self) -> Duration {
        timeouts::DEFAULT_TIMEOUT
    }

    /// The least privilege this rotator needs at its provider for every method below, scoped to
    /// the resources it is configured for (`keyrotd policy`). Implement it beside the calls, so
    /// that a new call and its permission are added together. The default is for rotators that
    /// call nothing.
    fn permissions(&self) -> Permissions {
        Permissions::none()
    }

    /// Creates a new credential. `current` is what the store holds now, if anything.
    ///
    /// The engine stages the result before anything else happens. If a crash loses the result,
    /// the engine calls [`Rotator::abandon`] before issuing again, so a provider that creates
    /// something (an IAM key) finds and removes what an earlier attempt left behind there.
    async fn issue(
        &self,
        ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError>;

    /// Makes the provider accept the staged credential (AWS's `setSecret`): for a database, the
    /// `ALTER ROLE`. Most rotators issue credentials that are live at once and keep the default.
    async fn activate(
        &self,
        _ctx: StepContext<'_>,
        _new: &Credential,
        _current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Proves that the new credential works, without changing anything.
    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError>;

    /// Undoes an unfinished rotation: removes what `issue` created and what `activate` changed, so
    /// that `current` is again the only working credential. `issued` is `None` when a crash lost
    /// the issued credential's attributes; the rotator then cleans up whatever it finds that is not
    /// `current`.
    async fn abandon(
        &self,
        ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError>;

    /// Revokes an old credential once the grace period has passed.
    async fn revoke(&self, ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError>;

    /// Whether [`Rotator::last_used`] can tell anything, as configured: the inventory refuses
    /// `revoke = "when_unused"` on a rotator that cannot.
    fn checks_use(&self) -> bool {
        false
    }

    /// What [`Rotator::last_used`] alone needs at the provider (`keyrotd policy` adds it only for
    /// credentials with `revoke = "when_unused"`).
    fn use_permissions(&self) -> Permissions {
        Permissions::none()
    }

    /// Whether the old credential (its public attributes `old`) was used at or after `since`:
    /// its replacement's promotion, then the start of the last check that found it in use. A
    /// use at or after `since` is [`Usage::InUse`]. Changes nothing. The default cannot tell.
    async fn last_used(
        &self,
        _ctx: StepContext<'_>,
        _old: &Attrs,
        _since: std::time::SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        Ok(UsageReport::unsupported(self.kind()))
    }
}

/// The *where* of a credential: the place consumers read its current value.
#[async_trait]
pub trait Store: Send + Sync {
    /// The `kind` this store is configured with (`file`, `aws_secrets_manager`).
    fn kind(&self) -> &'static str;

    /// A human-readable location for status output (a path, a secret id). Not secret.
    fn location(&self) -> String;

    /// The longest one step may wait for this store (its `timeout` field). The engine abandons a
    /// step past it as a transient failure, whatever the store does itself.
    fn timeout(&self) -> Duration {
        timeouts::DEFAULT_TIMEOUT
    }

    /// The least privilege this store needs for every method below, scoped to its location
    /// (`keyrotd policy`); see [`Rotator::permissions`]. The default is for stores that need
    /// nothing.
    fn permissions(&self) -> Permissions {
        Permissions::none()
    }

    /// The value consumers read now, if there is one.
    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError>;

    /// Writes `new` beside the current value, tagged with the rotation id. Re-staging the same
    /// rotation is a no-op.
    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError>;

    /// The value staged by this rotation, if it is still staged.
    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError>;

    /// Makes the staged value current and keeps the replaced one as previous. Promoting an
    /// already promoted rotation is a no-op.
    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError>;

    /// Drops the value staged by this rotation; the current one is untouched.
    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError>;

    /// Drops the previous value kept since this rotation's promotion (after revocation).
    async fn release_previous(&self, ctx: StepContext<'_>) -> Result<(), ProviderError>;

    /// The id of the rotation that wrote the current value, when the store records it (the
    /// `file` store's sidecar, a Secrets Manager version id). `None` when nothing keyrotd wrote is
    /// current, or when the store keeps no such record (the default).
    ///
    /// The engine compares it with its state database before every run: a rotation the database
    /// does not know means the database was lost, reset or belongs to another keyrotd, and
    /// rotating on top of it would silently discard what that rotation still has to do.
    async fn last_rotation(&self, _ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }
}

/// Whether `host` (a name, an IP address, or an IPv6 address in brackets) is this machine's
/// loopback: `localhost`, 127.0.0.0/8 or ::1. Plain-text protocols (HTTP, PostgreSQL without TLS)
/// are allowed only there, where no network sits between keyrotd and the server.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "[::1]",
        ] {
            assert!(super::is_loopback_host(host), "{host}");
        }
        for host in [
            "db.example.com",
            "10.0.0.1",
            "127.0.0.1.example.com",
            "localhost.example.com",
            "::ffff:10.0.0.1",
            "",
        ] {
            assert!(!super::is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_a_conflict_is_a_conflict() {
        let conflict = super::ProviderError::conflict("written by someone else");
        assert!(conflict.is_conflict());
        assert_eq!(conflict.class, super::ErrorClass::Permanent);
        // A provider's own code that happens to say "conflict" is not keyrotd's.
        assert!(!super::ProviderError::permanent("409")
            .with_code("conflict")
            .is_conflict());
        let mut transient = super::ProviderError::transient("x");
        transient.code = Some(super::CONFLICT.into());
        assert!(!transient.is_conflict());
    }
}
