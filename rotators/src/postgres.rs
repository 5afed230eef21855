//! The `postgres_password` rotator: the password of a PostgreSQL login role.
//!
//! keyrotd logs in with an admin connection string (always a secret reference) and changes the
//! target role's password with `ALTER ROLE "role" PASSWORD 'SCRAM-SHA-256$...'`. The SCRAM
//! verifier is computed here, so the plain password never travels to the server and never appears
//! in its statement log. Two strategies:
//!
//! - `single`: one role; its password changes in place. Consumers holding the old password fail
//!   until they re-read the store, so `abandon` puts the current password back.
//! - `alternating`: two roles (`roles = ["app_a", "app_b"]`); each rotation sets the password of
//!   the role that is *not* published, verifies it, and the store then publishes that role's user
//!   name and password together. Consumers never hold a password that stops working before they
//!   re-read the store. `revoke` may scramble the idle role's password after the grace period.
//!
//! `revoke` scrambles the role named by the *old* credential without checking the store: it relies
//! on the engine never starting the next rotation before the previous one's revoke is done (the
//! engine keeps a promoted rotation open through its grace period), since the next alternating
//! rotation gives that very role a new, published password.
//!
//! Every connection has `connect_timeout` for its TCP, TLS and login handshake, and each
//! operation (resolving the admin DSN, connecting, the statement) is bounded by `timeout`, which
//! the server also enforces as the `ALTER ROLE` session's `statement_timeout`, so a statement
//! stuck behind a lock is cancelled there too. A server that accepts the connection and never
//! answers fails the step as transient, and the dropped client closes its connection.
//!
//! TLS uses rustls with the public web roots plus `sslrootcert`; the certificate and host name
//! are always verified (libpq's `verify-full`), and an untrusted certificate is a permanent
//! error. `sslmode` defaults to `require`; `prefer` and `disable` are accepted only to a loopback
//! host or a Unix socket. The admin connection uses the admin DSN's own `sslmode` under the same
//! rule: to any other host its `prefer` (also libpq's default) is taken as `require`, and
//! `disable` is refused, so no password ever crosses a network in clear text.
//!
//! Invariant: neither the generated password nor the admin DSN's password is ever logged or put in
//! an error message; errors carry the operation, the role and the server's SQLSTATE.

use std::error::Error as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::random::{generate, Alphabet};
use crate::reference::SecretRef;
use crate::resolve::Resolve;
use crate::timeouts::{self, Timeouts};
use crate::{Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext};

/// How long before the step's deadline the server must cancel an `ALTER ROLE` still waiting, so
/// its cancellation reaches keyrotd before keyrotd gives up on the statement.
const SERVER_CANCEL_MARGIN: Duration = Duration::from_millis(250);

/// Attribute naming the role a credential logs in as.
pub const USERNAME_ATTR: &str = "username";

/// Configuration of the `postgres_password` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The admin connection string (key/value or URL form), as a secret reference.
    pub admin_dsn: SecretRef,
    /// `single` (one role) or `alternating` (two roles, zero downtime).
    pub strategy: Strategy,
    /// The role whose password rotates (`single`).
    #[serde(default)]
    pub role: Option<String>,
    /// The two roles used in turn (`alternating`).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Host the target role logs in to; defaults to the admin DSN's host(s).
    #[serde(default)]
    pub host: Option<String>,
    /// Port the target role logs in to; defaults to the admin DSN's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Database the target role logs in to; defaults to the admin DSN's database.
    #[serde(default)]
    pub dbname: Option<String>,
    /// TLS for the target role's login (`require`, the default; `prefer` or `disable` only to
    /// a loopback host or a Unix socket).
    #[serde(default)]
    pub sslmode: SslMode,
    /// A PEM file of CA certificates trusted for TLS besides the public web roots.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// A statement run by `verify` after logging in with the new password.
    #[serde(default)]
    pub probe_query: Option<String>,
    /// Length of generated passwords (16 to 1024).
    #[serde(default = "default_length")]
    pub length: usize,
    /// `alternating`: whether `revoke` sets the idle role's password to an unknown random value.
    #[serde(default = "default_true")]
    pub scramble_on_revoke: bool,
    /// The longest wait for one connection, TLS and login included (`"10s"`). A
    /// `connect_timeout` in the admin DSN may shorten it for the admin connection.
    #[serde(
        default = "timeouts::default_connect",
        deserialize_with = "timeouts::duration"
    )]
    pub connect_timeout: Duration,
    /// The longest one step may wait for the server (`"60s"`); also each statement's
    /// `statement_timeout`.
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

fn default_length() -> usize {
    32
}

fn default_true() -> bool {
    true
}

/// How a password is rotated.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One role, password changed in place.
    Single,
    /// Two roles used in turn.
    Alternating,
}

/// TLS policy for the target role's login, with libpq's names.
///
/// `require` is the default and verifies the certificate and the host name (libpq's
/// `verify-full`), against the public web roots and `sslrootcert`. `prefer` and `disable` are
/// allowed only to a loopback host or a Unix socket: over a network, a client that accepts a
/// plain connection lets an attacker in the middle strip TLS and ask for the password in clear
/// text, during `verify` (the new password) as on the admin connection (the admin's).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    /// Never use TLS (loopback and Unix sockets only).
    Disable,
    /// Use TLS when the server offers it (loopback and Unix sockets only).
    Prefer,
    /// Refuse to log in without TLS, and verify the server's certificate and name.
    #[default]
    Require,
}

impl PostgresConfig {
    /// Checks what can be checked without a connection; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let check_role = |field: &str, role: &str| {
            if role.is_empty() || role.len() > 63 || role.contains('\0') {
                Err(format!(
                    "{field}: `{role}` is not a valid role name (1 to 63 bytes)"
                ))
            } else {
                Ok(())
            }
        };
        match self.strategy {
            Strategy::Single => {
                let role = self
                    .role
                    .as_deref()
                    .ok_or("role: required by strategy \"single\"")?;
                check_role("role", role)?;
                if self.roles.is_some() {
                    return Err("roles: only for strategy \"alternating\"; use `role`".into());
                }
            }
            Strategy::Alternating => {
                let roles = self
                    .roles
                    .as_deref()
                    .ok_or("roles: required by strategy \"alternating\"")?;
                if roles.len() != 2 || roles[0] == roles[1] {
                    return Err("roles: must name exactly two different roles".into());
                }
                for role in roles {
                    check_role("roles", role)?;
                }
                if self.role.is_some() {
                    return Err("role: only for strategy \"single\"; use `roles`".into());
                }
            }
        }
        if !(16..=1024).contains(&self.length) {
            return Err(format!(
                "length: must be between 16 and 1024, got {}",
                self.length
            ));
        }
        if self.port == Some(0) {
            return Err("port: must not be 0".into());
        }
        if self.host.as_deref() == Some("") || self.dbname.as_deref() == Some("") {
            return Err("host/dbname: must not be empty when given".into());
        }
        if self
            .probe_query
            .as_deref()
            .is_some_and(|q| q.trim().is_empty())
        {
            return Err("probe_query: must not be empty when given".into());
        }
        if let Some(path) = &self.sslrootcert {
            if !path.is_absolute() {
                return Err(format!(
                    "sslrootcert: must be absolute, got `{}`",
                    path.display()
                ));
            }
        }
        // Without `host` the login goes to the admin DSN's hosts, known only once the secret is
        // read: `forbid_plain_text_over_network` checks them at every connection.
        if let Some(host) = self.host.as_deref() {
            if self.sslmode != SslMode::Require && !is_local(&Host::Tcp(host.to_owned())) {
                return Err(format!(
                    "sslmode: `{}` to `{host}` could send the password in clear text; \
                     `prefer` and `disable` are allowed only to a loopback host \
                     (127.0.0.0/8, ::1, localhost) or a Unix socket: use `require`",
                    self.sslmode.name()
                ));
            }
        }
        timeouts::validate(self.connect_timeout, self.timeout)
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }
}

impl SslMode {
    /// The name as written in the inventory.
    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
        }
    }
}

/// Whether a connection target is this machine: a Unix socket or a loopback address.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Tcp(name) => crate::is_loopback_host(name),
        Host::Unix(_) => true,
    }
}

/// Makes sure a connection can never send a password in clear text over a network. To any
/// host that is not loopback (or a Unix socket), `prefer` becomes `require`, so a server that
/// does not offer TLS (or an attacker stripping it) gets no password, and `disable` is refused.
/// `hostaddr`, when set, is where the connection really goes, so it must be local too.
fn forbid_plain_text_over_network(
    config: &mut tokio_postgres::Config,
    what: &str,
) -> Result<(), ProviderError> {
    let local = config.get_hosts().iter().all(is_local)
        && config.get_hostaddrs().iter().all(|a| a.is_loopback());
    if local {
        return Ok(());
    }
    match config.get_ssl_mode() {
        PgSslMode::Disable => Err(ProviderError::permanent(format!(
            "{what}: sslmode=disable to a host that is not loopback would send the password in \
             clear text; it is allowed only to 127.0.0.0/8, ::1, localhost or a Unix socket"
        ))),
        PgSslMode::Prefer => {
            config.ssl_mode(PgSslMode::Require);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The `postgres_password` rotator.
pub struct PostgresRotator {
    config: PostgresConfig,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for PostgresRotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRotator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresRotator {
    /// Builds the rotator from a configuration; validates it and loads `sslrootcert`.
    pub fn new(config: PostgresConfig) -> Result<Self, String> {
        config.validate()?;
        let tls = MakeRustlsConnect::new(tls_config(config.sslrootcert.as_deref())?);
        Ok(Self { config, tls })
    }

    /// Runs one operation within `timeout`; past it the operation fails as transient, and
    /// dropping it closes its connection.
    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        tokio::time::timeout(self.config.timeout, operation)
            .await
            .unwrap_or_else(|_| Err(ProviderError::no_answer(what, self.config.timeout)))
    }

    /// The admin DSN, parsed. Read at every use, so a rotated admin secret is picked up.
    async fn admin_config(&self, op: &str) -> Result<tokio_postgres::Config, ProviderError> {
        let dsn = self
            .config
            .admin_dsn
            .resolve_async(self.config.timeouts())
            .await
            .map_err(|e| ProviderError {
                class: e.class(),
                code: None,
                message: format!("{op}: admin_dsn {}: {e}", self.config.admin_dsn),
            })?;
        let mut config: tokio_postgres::Config = dsn.expose_secret().parse().map_err(|_| {
            // The parser's message could quote part of the string: say only where it came from.
            ProviderError::permanent(format!(
                "{op}: the admin DSN from {} is not a valid connection string",
                self.config.admin_dsn
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.config.timeouts().connect);
        }
        config.application_name("keyrotd");
        forbid_plain_text_over_network(&mut config, &format!("{op}: admin login"))?;
        Ok(config)
    }

    /// Connection parameters for logging in as `role` with `password`.
    async fn login_config(
        &self,
        op: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<tokio_postgres::Config, ProviderError> {
        let admin = self.admin_config(op).await?;
        let mut config = tokio_postgres::Config::new();
        match &self.config.host {
            Some(host) => {
                config.host(host);
            }
            None => {
                for host in admin.get_hosts() {
                    match host {
                        Host::Tcp(h) => config.host(h),
                        Host::Unix(p) => config.host_path(p),
                    };
                }
            }
        }
        match self.config.port {
            Some(port) => {
                config.port(port);
            }
            None => {
                for port in admin.get_ports() {
                    config.port(*port);
                }
            }
        }
        if let Some(db) = self.config.dbname.as_deref().or(admin.get_dbname()) {
            config.dbname(db);
        }
        config
            .user(role)
            .password(password.expose_secret())
            .ssl_mode(match self.config.sslmode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require => PgSslMode::Require,
            })
            .connect_timeout(self.config.timeouts().connect)
            .application_name("keyrotd-verify");
        forbid_plain_text_over_network(&mut config, &format!("{op}: login as role \"{role}\""))?;
        Ok(config)
    }

    async fn connect(
        &self,
        config: &tokio_postgres::Config,
        what: &str,
    ) -> Result<Client, ProviderError> {
        let connecting = config.connect(self.tls.clone());
        let (client, connection) =
            // The driver's own connect timeout covers TCP only; this one the whole handshake.
            // A second more lets the driver's more precise error win when both apply.
            tokio::time::timeout(self.config.timeouts().connect + Duration::from_secs(1), connecting)
                .await
                .map_err(|_| {
                    ProviderError::transient(format!("{what}: timed out connecting"))
                        .with_code("timeout")
                })?
                .map_err(|e| pg_error(what, &e))?;
        tokio::spawn(async move {
            // Errors surface on the client's next call; nothing to report here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Sets `role`'s password through the admin connection, as a client-side SCRAM verifier.
    async fn set_password(
        &self,
        op: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<(), ProviderError> {
        let what = format!("{op}: setting the password of role \"{role}\"");
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        self.bounded(&what, async {
            let admin = self.admin_config(op).await?;
            let client = self
                .connect(&admin, &format!("{what}: admin login"))
                .await?;
            let verifier =
                postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes());
            // The server cancels the statement itself, shortly *before* keyrotd gives up on it:
            // an ALTER ROLE queued behind a lock must never set the password after keyrotd
            // reported the step failed (and maybe rolled back), and closing the socket does not
            // stop a waiting backend.
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .saturating_sub(SERVER_CANCEL_MARGIN);
            if left.is_zero() {
                return Err(ProviderError::no_answer(&what, self.config.timeout));
            }
            let sql = format!(
                "SET statement_timeout = {}; ALTER ROLE {} PASSWORD {}",
                left.as_millis().max(1),
                quote_ident(role),
                quote_literal(&verifier)
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| pg_error(&what, &e))
        })
        .await
    }

    /// Logs in as `role` with `password` and runs the probe query.
    async fn try_login(
        &self,
        op: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<(), ProviderError> {
        let what = format!("{op}: logging in as role \"{role}\"");
        self.bounded(&what, async {
            let config = self.login_config(op, role, password).await?;
            let client = self.connect(&config, &what).await?;
            if let Some(probe) = &self.config.probe_query {
                client
                    .batch_execute(probe)
                    .await
                    .map_err(|e| pg_error(&format!("{what}: probe query"), &e))?;
            }
            Ok(())
        })
        .await
    }

    /// Sets `role`'s password to a random value nobody knows.
    async fn scramble(&self, op: &str, role: &str) -> Result<(), ProviderError> {
        self.set_password(
            op,
            role,
            &generate(self.config.length.max(32), Alphabet::Alphanumeric),
        )
        .await
    }

    fn single_role(&self) -> &str {
        self.config
            .role
            .as_deref()
            .expect("validated: single has a role")
    }

    fn alternating_roles(&self) -> (&str, &str) {
        let roles = self
            .config
            .roles
            .as_deref()
            .expect("validated: alternating has two roles");
        (&roles[0], &roles[1])
    }

    /// The role a new credential is for, given what the store holds now.
    fn next_role(&self, current: Option<&Credential>) -> &str {
        match self.config.strategy {
            Strategy::Single => self.single_role(),
            Strategy::Alternating => {
                let (a, b) = self.alternating_roles();
                let published = current
                    .and_then(|c| c.attrs.get(USERNAME_ATTR))
                    .map(String::as_str);
                if published == Some(a) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// The role of a credential this rotator issued; checks that it is one of the configured ones.
    fn role_of<'a>(&'a self, op: &str, attrs: &'a Attrs) -> Result<&'a str, ProviderError> {
        let role = attrs.get(USERNAME_ATTR).ok_or_else(|| {
            ProviderError::permanent(format!(
                "{op}: the credential has no `{USERNAME_ATTR}` attribute"
            ))
        })?;
        let known = match self.config.strategy {
            Strategy::Single => role == self.single_role(),
            Strategy::Alternating => {
                let (a, b) = self.alternating_roles();
                role == a || role == b
            }
        };
        if !known {
            return Err(ProviderError::permanent(format!(
                "{op}: role \"{role}\" is not one this rotator manages"
            )));
        }
        Ok(role)
    }
}

#[async_trait]
impl Rotator for PostgresRotator {
    fn kind(&self) -> &'static str {
        "postgres_password"
    }

    fn secret_field(&self) -> &str {
        "password"
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[USERNAME_ATTR]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    async fn issue(
        &self,
        _ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let role = self.next_role(current);
        Ok(Credential {
            secret: generate(self.config.length, Alphabet::Alphanumeric),
            attrs: Attrs::from([(USERNAME_ATTR.to_owned(), role.to_owned())]),
        })
    }

    async fn activate(
        &self,
        _ctx: StepContext<'_>,
        new: &Credential,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        let role = self.role_of("activate", &new.attrs)?;
        if self.config.strategy == Strategy::Alternating
            && current
                .and_then(|c| c.attrs.get(USERNAME_ATTR))
                .map(String::as_str)
                == Some(role)
        {
            // Changing the published role's password would cut its consumers off.
            return Err(ProviderError::permanent(format!(
                "activate: role \"{role}\" is the published one; alternating rotation only changes the idle role"
            )));
        }
        // Setting the same password again is harmless, so a re-run simply repeats the ALTER ROLE.
        self.set_password("activate", role, &new.secret).await
    }

    async fn verify(&self, _ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let role = self.role_of("verify", &new.attrs)?;
        self.try_login("verify", role, &new.secret).await
    }

    async fn abandon(
        &self,
        _ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        match self.config.strategy {
            Strategy::Single => {
                let role = self.single_role();
                match current {
                    // Consumers hold `current`: make it work again, whatever activate did.
                    Some(current) => self.set_password("abandon", role, &current.secret).await,
                    // Nobody holds a working password; make sure the discarded one stops working.
                    None => self.scramble("abandon", role).await,
                }
            }
            Strategy::Alternating => {
                let published = current
                    .and_then(|c| c.attrs.get(USERNAME_ATTR))
                    .map(String::as_str);
                let idle = match issued.and_then(|a| a.get(USERNAME_ATTR)) {
                    Some(_) => self.role_of("abandon", issued.expect("checked above"))?,
                    None => self.next_role(current),
                };
                if Some(idle) == published {
                    // Never touch the role consumers use.
                    return Ok(());
                }
                self.scramble("abandon", idle).await
            }
        }
    }

    async fn revoke(&self, _ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        // A single role's old password is already gone: activate replaced it in place.
        if self.config.strategy == Strategy::Single || !self.config.scramble_on_revoke {
            return Ok(());
        }
        let role = self.role_of("revoke", old)?;
        self.scramble("revoke", role).await
    }
}

/// The TLS client configuration: the public web roots plus an optional private CA file.
fn tls_config(sslrootcert: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = sslrootcert {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("sslrootcert: cannot read `{}`: {e}", path.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("sslrootcert: `{}` is not PEM: {e}", path.display()))?;
            roots.add(cert).map_err(|e| {
                format!("sslrootcert: bad certificate in `{}`: {e}", path.display())
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("sslmode: TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `"name"` with embedded quotes doubled: safe for any role name.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'value'` with embedded quotes doubled (a SCRAM verifier has none, but be safe).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Turns a driver error into a [`ProviderError`]: server errors keep their SQLSTATE and only the
/// server's primary message (details and hints can quote statements); connection problems are
/// transient.
fn pg_error(what: &str, e: &tokio_postgres::Error) -> ProviderError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let class = match &code[..2] {
            // connection exception, insufficient resources, operator intervention, rollback
            "08" | "53" | "57" | "40" => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        };
        return ProviderError {
            class,
            code: Some(code.to_owned()),
            message: format!("{what}: {}", db.message()),
        };
    }
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            // A refused, reset or timed-out connection may work later; a TLS certificate the
            // client does not trust (InvalidData) or a socket path it may not use will not.
            let class = match io.kind() {
                InvalidData | InvalidInput | PermissionDenied | NotFound => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            };
            return ProviderError {
                class,
                code: Some(format!("{:?}", io.kind())),
                message: format!("{what}: {io}"),
            };
        }
        source = err.source();
    }
    if e.is_closed() {
        return ProviderError::transient(format!("{what}: the connection was closed"));
    }
    // Configuration and TLS problems: retrying will not help.
    ProviderError::permanent(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_strategy: &str) -> PostgresConfig {
        serde_json::from_str(toml_strategy).unwrap()
    }

    #[test]
    fn validates_roles_per_strategy() {
        let ok = config(r#"{"admin_dsn":"env:X","strategy":"single","role":"app"}"#);
        assert!(ok.validate().is_ok());
        let missing = config(r#"{"admin_dsn":"env:X","strategy":"single"}"#);
        assert!(missing.validate().unwrap_err().starts_with("role:"));
        let one = config(r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a"]}"#);
        assert!(one.validate().unwrap_err().starts_with("roles:"));
        let same = config(r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a","a"]}"#);
        assert!(same.validate().unwrap_err().starts_with("roles:"));
        let short = config(r#"{"admin_dsn":"env:X","strategy":"single","role":"a","length":8}"#);
        assert!(short.validate().unwrap_err().starts_with("length:"));
        assert!(serde_json::from_str::<PostgresConfig>(
            r#"{"admin_dsn":"postgres://u:p@h/db","strategy":"single","role":"a"}"#
        )
        .is_err());
    }

    #[test]
    fn plain_text_modes_only_to_loopback_at_check_time() {
        let with = |host: &str, sslmode: Option<&str>| {
            let mut c = config(&format!(
                r#"{{"admin_dsn":"env:X","strategy":"single","role":"a","host":"{host}"}}"#
            ));
            if let Some(mode) = sslmode {
                c.sslmode = serde_json::from_value(serde_json::json!(mode)).unwrap();
            }
            c.validate()
        };
        assert_eq!(
            config(r#"{"admin_dsn":"env:X","strategy":"single","role":"a"}"#).sslmode,
            SslMode::Require,
            "require is the default"
        );
        for host in ["db.example.com", "10.1.2.3", "::ffff:10.1.2.3"] {
            for mode in ["disable", "prefer"] {
                let e = with(host, Some(mode)).unwrap_err();
                assert!(
                    e.starts_with("sslmode:") && e.contains("clear text"),
                    "{host} {mode}: {e}"
                );
            }
            assert!(with(host, None).is_ok());
            assert!(with(host, Some("require")).is_ok());
        }
        for host in ["127.0.0.1", "localhost", "::1"] {
            assert!(with(host, Some("disable")).is_ok(), "{host}");
            assert!(with(host, Some("prefer")).is_ok(), "{host}");
        }
    }

    #[test]
    fn connections_never_go_plain_over_a_network() {
        let check = |dsn: &str| {
            let mut c: tokio_postgres::Config = dsn.parse().unwrap();
            forbid_plain_text_over_network(&mut c, "test").map(|()| c.get_ssl_mode())
        };
        for dsn in [
            "host=db.example.com sslmode=disable",
            "host=127.0.0.1,db.example.com sslmode=disable",
            "host=localhost hostaddr=10.0.0.1 sslmode=disable",
            "postgres://u@10.0.0.1/db?sslmode=disable",
        ] {
            let e = check(dsn).unwrap_err();
            assert_eq!(e.class, ErrorClass::Permanent, "{dsn}");
            assert!(e.message.contains("clear text"), "{dsn}: {e}");
        }
        // libpq's default, `prefer`, becomes `require` over a network.
        assert_eq!(check("host=db.example.com").ok(), Some(PgSslMode::Require));
        assert_eq!(
            check("host=db.example.com sslmode=prefer").ok(),
            Some(PgSslMode::Require)
        );
        for (dsn, mode) in [
            ("host=127.0.0.1 sslmode=disable", PgSslMode::Disable),
            ("host=localhost sslmode=prefer", PgSslMode::Prefer),
            (
                "host=/var/run/postgresql sslmode=disable",
                PgSslMode::Disable,
            ),
            ("host=::1 sslmode=disable", PgSslMode::Disable),
        ] {
            assert_eq!(check(dsn).ok(), Some(mode), "{dsn}");
        }
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn alternating_picks_the_idle_role() {
        let r = PostgresRotator::new(config(
            r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a","b"]}"#,
        ))
        .unwrap();
        let cred = |u: &str| Credential {
            secret: SecretString::from("x".to_owned()),
            attrs: Attrs::from([(USERNAME_ATTR.to_owned(), u.to_owned())]),
        };
        assert_eq!(r.next_role(None), "a");
        assert_eq!(r.next_role(Some(&cred("a"))), "b");
        assert_eq!(r.next_role(Some(&cred("b"))), "a");
    }
}
