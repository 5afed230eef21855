//! Group commit: one thread owns the write connection. Writes from concurrent rotations queue on
//! a channel; the thread takes everything queued while its previous commit was in flight and
//! commits it in one transaction (one fsync), each write in its own savepoint, then hands each
//! caller its own result.
//!
//! Invariants:
//! - a caller learns its write's result only after the transaction holding it has committed (or
//!   failed to): nothing is reported done that is not durable;
//! - a write that fails (a lost lease, a unique constraint) is rolled back to its savepoint and
//!   fails alone; the rest of its batch commits;
//! - writes run in the order they were queued, one batch at a time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{CommitCounts, StateError};

/// At most this many writes share one transaction, so one commit's latency stays bounded.
const MAX_BATCH: usize = 512;

/// A queued write, type-erased so writes of every result type share one queue.
trait Pending: Send {
    /// Runs the write inside the batch's transaction; `false` if it failed and its savepoint must
    /// be rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Hands the caller its result once the batch has committed, or `failed` if it did not.
    fn finish(self: Box<Self>, failed: Option<&str>);
}

struct Queued<T, F> {
    write: Option<F>,
    result: Option<Result<T, StateError>>,
    reply: oneshot::Sender<Result<T, StateError>>,
}

impl<T, F> Pending for Queued<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StateError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = self.write.take().map(|write| write(conn));
        let ok = matches!(result, Some(Ok(_)));
        self.result = result;
        ok
    }

    fn finish(self: Box<Self>, failed: Option<&str>) {
        let result = match (failed, self.result) {
            (Some(why), _) => Err(StateError::Task(format!(
                "the write was not committed: {why}"
            ))),
            (None, Some(result)) => result,
            (None, None) => Err(StateError::Task("the write panicked".into())),
        };
        // The caller may have gone (its task was cancelled): the write stands all the same.
        let _ = self.reply.send(result);
    }
}

/// The handle on the writer thread; the thread ends when the last handle is dropped.
pub(super) struct Writer {
    queue: mpsc::Sender<Box<dyn Pending>>,
    /// The write connection, locked by the thread for each batch. `PRAGMA data_version` is read
    /// on it, because only other connections' commits move it.
    conn: Arc<Mutex<Connection>>,
    counts: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub(super) fn start(conn: Connection) -> Result<Self, StateError> {
        let (queue, rx) = mpsc::channel();
        let conn = Arc::new(Mutex::new(conn));
        let counts = Arc::new(Counters::default());
        let (c, n) = (conn.clone(), counts.clone());
        std::thread::Builder::new()
            .name("keyrotd-state-writer".into())
            .spawn(move || run(&c, &rx, &n))
            .map_err(|e| StateError::Task(format!("starting the state writer: {e}")))?;
        Ok(Self {
            queue,
            conn,
            counts,
        })
    }

    /// Queues `write` and waits until the batch holding it has committed.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            write: Some(write),
            result: None,
            reply,
        };
        self.queue
            .send(Box::new(queued))
            .map_err(|_| StateError::Task("the state writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StateError::Task("the state writer stopped before answering".into()))?
    }

    /// The write connection, between batches.
    pub(super) fn connection(&self) -> &Arc<Mutex<Connection>> {
        &self.conn
    }

    /// Transactions committed so far, and the writes they carried.
    pub(super) fn counts(&self) -> CommitCounts {
        CommitCounts {
            commits: self.counts.commits.load(Ordering::Relaxed),
            writes: self.counts.writes.load(Ordering::Relaxed),
        }
    }
}

/// The writer thread: one batch per loop, until every handle is gone.
fn run(conn: &Mutex<Connection>, queue: &mpsc::Receiver<Box<dyn Pending>>, counts: &Counters) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        let committed = {
            // A panic cannot leave SQLite inconsistent (the transaction rolls back), so a
            // poisoned lock is safe to keep using.
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            commit(&conn, &mut batch)
        };
        let failed = committed.as_ref().err().map(ToString::to_string);
        if failed.is_none() {
            counts.commits.fetch_add(1, Ordering::Relaxed);
            counts
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        for write in batch {
            write.finish(failed.as_deref());
        }
    }
}

/// Runs `batch` in one transaction, each write in a savepoint of its own.
fn commit(conn: &Connection, batch: &mut [Box<dyn Pending>]) -> rusqlite::Result<()> {
    let exec = |sql: &str| conn.prepare_cached(sql)?.execute([]).map(drop);
    exec("BEGIN IMMEDIATE")?;
    let written = batch.iter_mut().try_for_each(|write| {
        exec("SAVEPOINT write")?;
        if !catch_unwind(AssertUnwindSafe(|| write.run(conn))).unwrap_or(false) {
            exec("ROLLBACK TO write")?;
        }
        exec("RELEASE write")
    });
    let committed = written.and_then(|()| exec("COMMIT"));
    if committed.is_err() && !conn.is_autocommit() {
        let _ = exec("ROLLBACK");
    }
    committed
}

/// Crash testing: with `KEYROTD_FAILPOINT=STEP:EVENT:uncommitted` (`promote:ok:uncommitted`),
/// the writer announces on stderr that the journal row is written into its batch but not yet
/// committed, and hangs there holding the batch open, so a test can `kill -9` the process
/// between a queued write and its commit. Unset, this costs one load.
pub(super) fn uncommitted_failpoint(step: &str, event: &str) {
    static POINT: std::sync::OnceLock<Option<(String, String)>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| {
        let point = std::env::var("KEYROTD_FAILPOINT").ok()?;
        let (step, event) = point.strip_suffix(":uncommitted")?.split_once(':')?;
        Some((step.to_owned(), event.to_owned()))
    });
    if point.as_ref().is_some_and(|(s, e)| s == step && e == event) {
        eprintln!("keyrotd: failpoint {step}:{event}:uncommitted reached; hanging until killed");
        loop {
            std::thread::park();
        }
    }
}
