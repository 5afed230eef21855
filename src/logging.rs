//! The log filter and format of the daemon and the CLI.
//!
//! Without `KEYROTD_LOG`, keyrotd's own crates log at INFO and every other crate at WARN
//! ([`DEFAULT_DIRECTIVES`]): the SDKs and client libraries announce routine work at INFO (the AWS
//! SDK logs every credential provider it builds from `~/.aws/credentials`), which is noise in a
//! service's journal. Colour codes are written only when stderr is a terminal (and `NO_COLOR` is
//! unset), so journald and log files get plain text.
//!
//! `KEYROTD_LOG` chooses what is logged, with one exception no setting can lift: the database,
//! HTTP, TLS, AWS and Vault client libraries keyrotd uses log statements, request and response bodies
//! and connection parameters at debug and trace level. Those carry what keyrotd must never show:
//! tokio-postgres prints every statement, `ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'` included
//! (a password hash), and the AWS SDK prints response bodies, `CreateAccessKey`'s secret key
//! included. Their events are therefore capped at [`LIBRARY_CAP`] by a second filter that every
//! event must also pass. It is a separate filter rather than a directive appended to the user's
//! own, because `EnvFilter` lets the most specific directive win, so `tokio_postgres::query=trace`
//! would override an appended `tokio_postgres=info`.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The most verbose level the client libraries in [`CAPPED_TARGETS`] may log at.
pub const LIBRARY_CAP: Level = Level::INFO;

/// Log targets (module path prefixes, for `log` records as for `tracing` events) of the client
/// libraries whose debug and trace output can contain secrets: statements, bodies, headers.
pub const CAPPED_TARGETS: &[&str] = &[
    "tokio_postgres",
    "postgres_protocol",
    "postgres_types",
    "tokio_postgres_rustls",
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "h2",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "aws_smithy",
    "aws_sdk",
    "aws_config",
    "aws_sigv4",
    "aws_runtime",
    "aws_credential_types",
    "aws_types",
    "lettre",
    "rusqlite",
    "tower",
    "tower_http",
    "axum",
];

/// Client libraries that log nothing at all: vaultrs and its transport log every failed call at
/// ERROR (an expected 404 included), which keyrotd reports itself with its context, and their
/// debug output holds request and response bodies.
pub const SILENCED_TARGETS: &[&str] = &["vaultrs", "rustify"];

/// The filter directives used when `KEYROTD_LOG` is unset (or not valid): INFO for keyrotd's own
/// crates, WARN for every other crate.
pub const DEFAULT_DIRECTIVES: &str = "warn,keyrotd=info,keyrotd_providers=info,keyrotd_plugin=info";

/// Log format on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines, coloured only on a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields` with the message and
    /// the event's fields, and the enclosing `span`/`spans`), for log shippers.
    Json,
}

/// The filter every event passes: the user's `KEYROTD_LOG` (default [`DEFAULT_DIRECTIVES`]) and
/// the cap on the client libraries.
pub fn filter<S>(user: Option<&str>) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let user = user
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_DIRECTIVES));
    let cap = CAPPED_TARGETS
        .iter()
        .fold(Targets::new().with_default(Level::TRACE), |t, target| {
            t.with_target(*target, LIBRARY_CAP)
        });
    let cap = SILENCED_TARGETS.iter().fold(cap, |t, target| {
        t.with_target(*target, tracing_subscriber::filter::LevelFilter::OFF)
    });
    user.and(cap)
}

/// Whether text logs get ANSI colour codes: only on a terminal, and not when `NO_COLOR` is set
/// to a non-empty value (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber writing to stderr, filtered by `KEYROTD_LOG`. Also routes the
/// `log` crate's records (tokio-postgres logs through it) into the same filter.
pub fn init(format: Format) {
    let user = std::env::var("KEYROTD_LOG").ok();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(format == Format::Text && colour());
    let registry = tracing_subscriber::registry();
    match format {
        Format::Text => registry
            .with(layer.with_filter(filter(user.as_deref())))
            .init(),
        Format::Json => registry
            .with(layer.json().with_filter(filter(user.as_deref())))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps everything in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(user: impl Into<Option<&'static str>>) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_filter(filter(user.into()));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::debug!(target: "tokio_postgres::query", "executing statement ALTER ROLE");
            tracing::trace!(target: "aws_smithy_runtime::client", "response body SECRETBODY");
            tracing::debug!(target: "hyper_util::client", "hyper debug");
            tracing::info!(target: "tokio_postgres::connection", "server notice");
            tracing::info!(target: "aws_config::profile::credentials", "sdk chatter");
            tracing::warn!(target: "aws_runtime::env_config", "sdk warning");
            tracing::debug!(target: "keyrotd::engine", "own debug line");
            tracing::info!(target: "keyrotd::engine", "own info line");
            tracing::info!(target: "keyrotd_providers::aws", "provider info line");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn client_libraries_stay_at_info_whatever_the_user_asks() {
        for user in [
            "trace",
            "debug",
            "tokio_postgres=trace,aws_smithy_runtime=trace,hyper_util=trace,trace",
            "tokio_postgres::query=trace,aws_smithy_runtime::client=trace,debug",
        ] {
            let text = logged(user);
            assert!(!text.contains("ALTER ROLE"), "{user}: {text}");
            assert!(!text.contains("SECRETBODY"), "{user}: {text}");
            assert!(!text.contains("hyper debug"), "{user}: {text}");
            assert!(text.contains("server notice"), "{user}: {text}");
            assert!(text.contains("own debug line"), "{user}: {text}");
        }
        let quiet = logged("warn");
        assert!(!quiet.contains("server notice") && !quiet.contains("own debug line"));
    }

    #[test]
    fn by_default_only_keyrotd_logs_at_info() {
        for user in [None, Some("keyrotd=loudest")] {
            let text = logged(user);
            assert!(text.contains("own info line"), "{user:?}: {text}");
            assert!(text.contains("provider info line"), "{user:?}: {text}");
            assert!(text.contains("sdk warning"), "{user:?}: {text}");
            assert!(!text.contains("sdk chatter"), "{user:?}: {text}");
            assert!(!text.contains("server notice"), "{user:?}: {text}");
            assert!(!text.contains("own debug line"), "{user:?}: {text}");
        }
        // Asked for, third-party INFO shows.
        assert!(logged("info").contains("sdk chatter"));
    }
}
