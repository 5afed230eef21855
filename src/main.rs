//! The `keyrotd` command line. Exit status: 0 success, 1 the operation failed, 2 a usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use keyrotd::{audit, cli, config, daemon, logging, policy};

#[derive(Parser)]
#[command(
    name = "keyrotd",
    version,
    about = "Rotates credentials on a schedule, durably and without cutting consumers off"
)]
struct Args {
    /// The inventory.
    #[arg(long, global = true, env = "KEYROTD_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log format on stderr: `text` (coloured only on a terminal) or `json` (one object per
    /// line, for log shippers). The level comes from `KEYROTD_LOG` (default: keyrotd's own
    /// logs at info, other crates' at warn).
    #[arg(long, global = true, env = "KEYROTD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

impl From<LogFormat> for logging::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Validate the inventory and print each credential's next rotations.
    Check,
    /// Show every credential's state, age and next rotation (with ID, one credential and its
    /// delivery hooks' latest results).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this credential, with its delivery hooks' latest results.
        id: Option<String>,
    },
    /// Rotate one credential now (safe alongside a running daemon).
    Rotate {
        /// The credential's id.
        id: String,
        /// Show what would happen and check the store is reachable; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Accept the value the store holds, written by a rotation this state database does not
    /// know (state lost, restored or from another keyrotd), and resume automation. Issues
    /// nothing; see README "Lost or foreign state".
    Adopt {
        /// The credential's id.
        id: String,
    },
    /// List past rotations and their steps (also of credentials removed from the inventory).
    History {
        /// Only this credential.
        id: Option<String>,
        /// How many rotations to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Print the least privilege each credential's rotator and store need, scoped to its
    /// resources: an AWS IAM policy, PostgreSQL grants, and what no policy language states.
    /// Reads no secret and no state.
    Policy {
        /// Only this credential.
        id: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL on stdout (e.g. `keyrotd completions bash >
    /// /usr/share/bash-completion/completions/keyrotd`). Reads no inventory.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The tamper-evident audit trail of every rotation step (see README "Audit trail").
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the man page (roff) on stdout (e.g. `keyrotd man > keyrotd.1`). Reads no inventory.
    Man,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the journal's hash chain: print its row count and head hash (exit 0), or name the
    /// first edited, deleted or reordered row (exit 1).
    Verify,
    /// Print the journal as JSON lines (time, credential, rotation, step, event, actor,
    /// trigger, error and its code, hash), oldest first.
    Export {
        /// Only rows at or after this time: RFC 3339, or a duration before now (`7d`).
        #[arg(long)]
        since: Option<String>,
        /// Only this credential's rows.
        #[arg(long)]
        credential: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if matches!(
        args.command,
        Command::Check
            | Command::Policy { .. }
            | Command::Status { .. }
            | Command::History { .. }
            | Command::Audit { .. }
            | Command::Completions { .. }
            | Command::Man
    ) {
        end_quietly_on_a_closed_pipe();
    }
    // Generated from the argument definitions themselves, so they never drift from them.
    match &args.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Args::command(),
                "keyrotd",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the man page: {e}");
                    ExitCode::from(cli::EXIT_FAILED)
                }
            };
        }
        _ => {}
    }
    keep_loopback_off_proxies();
    let format = args.log_format.into();
    logging::init(format);
    let complain = |line: std::fmt::Arguments<'_>| complain(format, line);
    let inventory = match config::load(&args.config) {
        Ok(inventory) => inventory,
        Err(errors) => {
            complain(format_args!("{errors}"));
            return ExitCode::from(2);
        }
    };
    // `vault:` references are read through the `[vault]` connection, as `aws-sm:` ones through
    // the default AWS chain.
    keyrotd_providers::resolve::set_vault_defaults(&inventory.vault);
    if let Command::Rotate { id, .. }
    | Command::Adopt { id }
    | Command::Policy { id: Some(id), .. } = &args.command
    {
        if !inventory.credentials.iter().any(|c| &c.id == id) {
            complain(format_args!(
                "error: no credential `{id}` in {}",
                args.config.display()
            ));
            return ExitCode::from(2);
        }
    }
    if matches!(
        args.command,
        Command::Run | Command::Check | Command::Rotate { .. } | Command::Adopt { .. }
    ) {
        if let Err(errors) = config::check_references(&inventory) {
            complain(format_args!("{errors}"));
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            complain(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Command::Run => daemon::run(inventory).await.map(|()| 0),
            Command::Check => cli::check(&inventory).await.map(|()| 0),
            Command::Status { json, id } => cli::status(&inventory, json, id.as_deref()).await,
            Command::Rotate { id, dry_run } => cli::rotate(&inventory, &id, dry_run).await,
            Command::Adopt { id } => cli::adopt(&inventory, &id).await,
            Command::History { id, limit } => cli::history(&inventory, id.as_deref(), limit).await,
            Command::Policy { id, json } => {
                policy::policy(&inventory, id.as_deref(), json).map(|()| 0)
            }
            Command::Audit { command } => match command {
                AuditCommand::Verify => audit::verify(&inventory).await,
                AuditCommand::Export { since, credential } => {
                    audit::export(&inventory, since.as_deref(), credential.as_deref()).await
                }
            },
            Command::Completions { .. } | Command::Man => {
                unreachable!("handled before the inventory is read")
            }
        }
    });
    // A task stuck in a blocking call (the daemon gave up on it at its shutdown deadline) must
    // not keep the process alive: dropping the runtime would wait for it without limit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e)
            if e.downcast_ref::<keyrotd::state::RemovedWhileOpen>()
                .is_some() =>
        {
            complain(format_args!("{e}"));
            ExitCode::from(cli::EXIT_USAGE)
        }
        Err(e) => {
            complain(format_args!("error: {e:#}"));
            ExitCode::from(cli::EXIT_FAILED)
        }
    }
}

/// Writes an error on stderr: as text, or with `--log-format json` as an ERROR event, so that
/// every line a log shipper reads is one JSON object. A closed stderr must not turn an error into
/// a panic: the exit status still says what happened.
fn complain(format: logging::Format, line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    match format {
        logging::Format::Text => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        logging::Format::Json => tracing::error!("{line}"),
    }
}

/// The loopback addresses, for `NO_PROXY`.
const LOOPBACK: &str = "localhost,127.0.0.0/8,::1";

/// Keeps requests to loopback away from an HTTP proxy named in the environment (`HTTP_PROXY`,
/// `HTTPS_PROXY`, `ALL_PROXY`). Every HTTP client keyrotd uses (reqwest: the `http` rotator,
/// hooks, webhooks, and vaultrs's client, which keyrotd cannot configure) honours those and
/// `NO_PROXY`. Plain `http://` is allowed only to loopback, on the grounds that no network sits
/// between: a proxy would carry its tokens and secrets in clear text over one. HTTPS through a
/// proxy is tunnelled end to end and stays allowed.
fn keep_loopback_off_proxies() {
    let proxied = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|value| !value.is_empty()));
    if !proxied {
        return;
    }
    for name in ["NO_PROXY", "no_proxy"] {
        let value = match std::env::var(name) {
            Ok(existing) if !existing.trim().is_empty() => format!("{existing},{LOOPBACK}"),
            _ => LOOPBACK.to_owned(),
        };
        // SAFETY (set_var is unsafe from the 2024 edition on): called before any other thread
        // exists, before logging and the async runtime start.
        std::env::set_var(name, value);
    }
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores, so that a read-only
/// command whose reader went away (`keyrotd history | head -1`) ends at once and silently, as
/// `cat` or `ls` do, instead of panicking on the failed write with exit status 101. Only the
/// read-only commands do this: `run` and `rotate` talk to providers, where a peer closing a Unix
/// socket must be an error to handle, not a signal that kills a rotation between two steps.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
