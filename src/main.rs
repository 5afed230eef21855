//! The `keyrotd` command line. Exit status: 0 success, 1 the operation failed, 2 a usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyrotd::{cli, config, daemon};

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
    /// Log format on stderr.
    #[arg(long, global = true, env = "KEYROTD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Validate the inventory and print each credential's next rotations.
    Check,
    /// Show every credential's state, age and next rotation.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let inventory = match config::load(&args.config) {
        Ok(inventory) => inventory,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    if let Command::Rotate { id, .. } | Command::Adopt { id } = &args.command {
        if !inventory.credentials.iter().any(|c| &c.id == id) {
            eprintln!("error: no credential `{id}` in {}", args.config.display());
            return ExitCode::from(2);
        }
    }
    if matches!(
        args.command,
        Command::Run | Command::Check | Command::Rotate { .. } | Command::Adopt { .. }
    ) {
        if let Err(errors) = config::check_references(&inventory) {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Command::Run => daemon::run(inventory).await.map(|()| 0),
            Command::Check => cli::check(&inventory).await.map(|()| 0),
            Command::Status { json } => cli::status(&inventory, json).await,
            Command::Rotate { id, dry_run } => cli::rotate(&inventory, &id, dry_run).await,
            Command::Adopt { id } => cli::adopt(&inventory, &id).await,
            Command::History { id, limit } => cli::history(&inventory, id.as_deref(), limit).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.downcast_ref::<daemon::RemovedWhileOpen>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(cli::EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::EXIT_FAILED)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYROTD_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
