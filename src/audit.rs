//! The audit trail's faces: `keyrotd audit verify` and `keyrotd audit export`, and the daemon's
//! side of it, which appends every journal row to `daemon.audit_log` as a JSON line and prunes
//! history older than `daemon.history_retention` behind a checkpoint.
//!
//! Invariants:
//! - the audit log is opened append-only (`O_APPEND`), mode 0600, never through a symlink and
//!   never if it is not a regular file; keyrotd never truncates or rewrites it;
//! - each journal row reaches the log before pruning may delete it: every pass appends first and
//!   prunes after, and a row is pruned only long after it was written;
//! - after a restart the log continues after the last `seq` it holds, so a row is written at
//!   least once (a crash between the write and its sync may repeat a few lines, never lose one).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{DaemonSettings, Inventory};
use crate::state::audit::{AuditFilter, AuditLine};
use crate::state::chain::hex;
use crate::state::{open_state, StateStore};

/// Rows read from the database per query.
const PAGE: usize = 10_000;

/// How often the daemon appends new rows to its audit log.
const APPEND_EVERY: Duration = Duration::from_secs(1);

/// How often the daemon prunes expired history.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// `keyrotd audit verify`: 0 and the row count and head hash if the chain is intact, 1 and the
/// first broken row otherwise.
pub async fn verify(inventory: &Inventory) -> anyhow::Result<u8> {
    let state = open_state(inventory)?;
    match state.verify_journal().await? {
        Ok(intact) => {
            let pruned = match intact.checkpoint.pruned {
                0 => String::new(),
                n => format!(
                    "; {n} older row(s) pruned, checkpoint at row {} ({})",
                    intact.checkpoint.seq,
                    hex(&intact.checkpoint.hash)
                ),
            };
            println!(
                "journal intact: {} row(s), head row {} hash {}{pruned}",
                intact.rows,
                intact.head_seq,
                hex(&intact.head)
            );
            Ok(0)
        }
        Err(broken) => {
            eprintln!("error: journal tampered with: {broken}");
            Ok(1)
        }
    }
}

/// `keyrotd audit export [--since T] [--credential ID]`: one JSON line per journal row.
pub async fn export(
    inventory: &Inventory,
    since: Option<&str>,
    credential: Option<&str>,
) -> anyhow::Result<u8> {
    let since_ms = since.map(parse_since).transpose()?;
    let state = open_state(inventory)?;
    let mut filter = AuditFilter {
        after_seq: 0,
        since_ms,
        credential: credential.map(str::to_owned),
        limit: PAGE,
    };
    let mut out = std::io::stdout().lock();
    loop {
        let lines = state.audit_lines(&filter).await?;
        let Some(last) = lines.last() else { break };
        filter.after_seq = last.seq;
        out.write_all(render(&lines).as_bytes())?;
        if lines.len() < PAGE {
            break;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `--since`: an RFC 3339 time, or a duration before now (`7d`, `12h`).
fn parse_since(text: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        anyhow::anyhow!("--since `{text}` is neither an RFC 3339 time nor a duration like 7d")
    })?;
    let ago = chrono::Duration::from_std(ago).context("--since is too long ago")?;
    Ok((chrono::Utc::now() - ago).timestamp_millis())
}

/// JSON lines, each ending in a newline.
fn render(lines: &[AuditLine]) -> String {
    let mut text = String::new();
    for line in lines {
        text += &serde_json::to_string(line).expect("an audit line serializes");
        text.push('\n');
    }
    text
}

/// Opens the audit log at `path` for appending, with the `seq` of its last line (0 if new): created
/// 0600 if missing, narrowed to 0600 if wider; refused if it is a symlink, not a regular file
/// (a FIFO or device is not waited on: `O_NONBLOCK`), or a file other than an audit log (left
/// untouched, its mode included).
fn open_append(path: &Path) -> anyhow::Result<(File, i64)> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!(
                "audit log {}: it is a symbolic link: refused, keyrotd never follows one",
                path.display()
            ),
            _ => anyhow::anyhow!("audit log {}: {e}", path.display()),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        anyhow::bail!("audit log {}: not a regular file: refused", path.display());
    }
    let after = last_seq(&mut file, path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((file, after))
}

/// The `seq` of the log's last complete line; 0 for an empty log. A file that holds something
/// else (the state database, a store's secret file, any file named by mistake) is refused, so
/// nothing is ever appended to it.
fn last_seq(file: &mut File, path: &Path) -> anyhow::Result<i64> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(0);
    }
    let from = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    file.take(len - from).read_to_end(&mut tail)?;
    // Lossy: the cut at `from` may fall inside a character of a line that is not read anyway.
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("seq")?.as_i64())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "audit log {}: not empty, and not a keyrotd audit log (no JSON line with a `seq` in its last 64 KiB): refused, so that nothing is appended to another file; name a new file",
                path.display()
            )
        })
}

/// The daemon's audit work: the audit log (if configured) and pruning.
pub struct Trail {
    state: Arc<dyn StateStore>,
    log: Option<(File, i64)>,
    retention: Duration,
}

impl Trail {
    /// Opens the audit log, if configured; an unusable one stops the daemon from starting.
    pub async fn open(
        settings: &DaemonSettings,
        state: Arc<dyn StateStore>,
    ) -> anyhow::Result<Self> {
        let log = match &settings.audit_log {
            None => None,
            Some(path) => {
                // A new log starts at the oldest row kept.
                let (file, after) = open_append(path)?;
                info!(path = %path.display(), after_seq = after, "audit log opened");
                Some((file, after))
            }
        };
        Ok(Self {
            state,
            log,
            retention: settings.history_retention,
        })
    }

    /// Appends new rows and prunes on their timers until `stop`, then appends once more.
    pub fn start(mut self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut append = tokio::time::interval(APPEND_EVERY);
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = append.tick() => self.append().await,
                    _ = prune.tick() => {
                        self.append().await;
                        self.prune().await;
                    }
                    () = stop.cancelled() => break,
                }
            }
            self.append().await;
        })
    }

    /// Appends every row written since the last pass.
    async fn append(&mut self) {
        let Some((file, after)) = &mut self.log else {
            return;
        };
        loop {
            let filter = AuditFilter {
                after_seq: *after,
                limit: PAGE,
                ..AuditFilter::default()
            };
            let lines = match self.state.audit_lines(&filter).await {
                Ok(lines) => lines,
                Err(e) => return warn!(error = %e, "reading the journal for the audit log failed"),
            };
            let Some(last) = lines.last().map(|l| l.seq) else {
                return;
            };
            if let Err(e) = file
                .write_all(render(&lines).as_bytes())
                .and_then(|()| file.sync_data())
            {
                return warn!(error = %e, "appending to the audit log failed; retrying");
            }
            *after = last;
            if lines.len() < PAGE {
                return;
            }
        }
    }

    /// Prunes history older than the retention.
    async fn prune(&self) {
        let retention = i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX);
        let before = chrono::Utc::now().timestamp().saturating_sub(retention);
        match self.state.prune(before).await {
            Ok(p) if p.rotations > 0 => info!(
                rotations = p.rotations,
                rows = p.rows,
                checkpoint = p.checkpoint.seq,
                "pruned history older than daemon.history_retention"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning expired history failed"),
        }
    }
}
