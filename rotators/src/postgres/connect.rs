//! Connections to PostgreSQL: the admin connection and the target role's login, TLS, the
//! connect timeout and the step's deadline, and how driver errors become [`ProviderError`]s.
//!
//! Invariants: no connection sends a password in clear text over a network (see
//! [`forbid_plain_text_over_network`]); TLS always verifies the certificate and the host name;
//! every operation ends within the step's `timeout`; error messages never carry the admin DSN or
//! a password.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::Client;

use super::config::SslMode;
use super::pool::Target;
use super::PostgresRotator;
use crate::resolve::Resolve;
use keyrotd_plugin::{ErrorClass, ProviderError};

/// Whether a connection target is this machine: a Unix socket or a loopback address.
pub(super) fn is_local(host: &Host) -> bool {
    match host {
        Host::Tcp(name) => keyrotd_plugin::is_loopback_host(name),
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

impl PostgresRotator {
    /// Runs one operation within `timeout`; past it the operation fails as transient, and
    /// dropping it closes its connection.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        operation: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        tokio::time::timeout(self.config.timeout, operation)
            .await
            .unwrap_or_else(|_| Err(ProviderError::no_answer(what, self.config.timeout)))
    }

    /// The admin DSN, parsed. Read at every use, so a rotated admin secret is picked up.
    pub(super) async fn admin_config(
        &self,
        op: &str,
    ) -> Result<tokio_postgres::Config, ProviderError> {
        Ok(self.admin_target(op).await?.0)
    }

    /// The admin DSN, parsed, and the pool key of its connections (see [`super::pool`]).
    pub(super) async fn admin_target(
        &self,
        op: &str,
    ) -> Result<(tokio_postgres::Config, Target), ProviderError> {
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
        let target = Target {
            dsn: SecretString::from(dsn.expose_secret()),
            sslrootcert: self.config.sslrootcert.clone(),
        };
        Ok((config, target))
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

    /// Connects with `config`; the whole handshake, TLS and login included, must end within
    /// `connect_timeout` and a second. The connection runs in a task of its own.
    pub(super) async fn connect(
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

    /// Logs in as `role` with `password` and runs the probe query.
    pub(super) async fn try_login(
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
}

/// The TLS client configuration: the public web roots plus an optional private CA file.
pub(super) fn tls_config(
    sslrootcert: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
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

/// Turns a driver error into a [`ProviderError`]: server errors keep their SQLSTATE and only the
/// server's primary message (details and hints can quote statements); connection problems are
/// transient.
pub(super) fn pg_error(what: &str, e: &tokio_postgres::Error) -> ProviderError {
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
}
