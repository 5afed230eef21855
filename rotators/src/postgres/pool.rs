//! A small pool of admin connections per admin target, shared by every `postgres_password`
//! credential that uses the same admin: one `ALTER ROLE` no longer costs a new TCP connection, TLS
//! handshake, SCRAM login and backend process on each side.
//!
//! A target is the resolved admin DSN together with `sslrootcert` (the TLS trust the connection
//! was made with), so a rotated admin secret simply starts a new pool and the old one idles out.
//!
//! Invariants: a target has at most `size` connections at once, checked out or idle (`size` is
//! the largest `admin_connections` among the credentials that use it); a connection goes back to
//! the pool only after a statement succeeded on it, so one that failed, timed out or was dropped
//! mid-statement is closed; an idle connection is closed after [`IDLE_TIMEOUT`], and a closed one
//! (killed by the server, or whose runtime ended) is never handed out; the key holds the admin
//! DSN, a secret, and is never printed.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;

/// How long an unused admin connection stays open.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An admin target: the resolved admin DSN and the TLS trust. No `Debug`: the DSN is a secret,
/// kept in a [`SecretString`] (wiped when the pool goes) and compared only as a map key.
pub(super) struct Target {
    /// The admin DSN as resolved, password included.
    pub(super) dsn: SecretString,
    /// The CA file the connections trust besides the web roots.
    pub(super) sslrootcert: Option<PathBuf>,
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.dsn.expose_secret() == other.dsn.expose_secret()
            && self.sslrootcert == other.sslrootcert
    }
}

impl Eq for Target {}

impl Hash for Target {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.dsn.expose_secret().hash(state);
        self.sslrootcert.hash(state);
    }
}

/// Every live pool, and the task that closes idle connections.
struct Registry {
    pools: HashMap<Target, Arc<Pool>>,
    reaper: Option<JoinHandle<()>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        pools: HashMap::new(),
        reaper: None,
    })
});

fn registry() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves only a map of pools behind: still usable.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The admin connections of one target.
pub(super) struct Pool {
    /// One permit per connection that may exist; a checked-out connection holds one.
    permits: Arc<Semaphore>,
    state: Mutex<State>,
}

struct State {
    /// The pool's bound: permits handed to the semaphore so far.
    size: usize,
    /// Connections not in use, with when each was returned.
    idle: Vec<(Client, Instant)>,
    /// When a connection was last checked out or returned.
    last_used: Instant,
}

/// A checked-out admin connection. Dropped without [`Pooled::release`], it is closed.
pub(super) struct Pooled {
    client: Option<Client>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    /// Whether the connection served an earlier statement (so it may have died since).
    pub(super) reused: bool,
}

impl Pooled {
    /// The connection.
    pub(super) fn client(&self) -> &Client {
        self.client.as_ref().expect("present until released")
    }

    /// Puts the connection back for the next statement; call only after one succeeded on it.
    pub(super) fn release(mut self) {
        if let Some(client) = self.client.take() {
            let now = Instant::now();
            let mut state = self.pool.state();
            state.idle.push((client, now));
            state.last_used = now;
        }
    }
}

/// The pool of `target`, created on first use, at least `size` connections big.
pub(super) fn pool(target: Target, size: usize) -> Arc<Pool> {
    let mut registry = registry();
    if registry.reaper.as_ref().is_none_or(JoinHandle::is_finished) {
        // Also after the runtime that ran the previous reaper ended (tests run one per test).
        registry.reaper = Some(tokio::spawn(reap()));
    }
    let pool = registry
        .pools
        .entry(target)
        .or_insert_with(|| {
            Arc::new(Pool {
                permits: Arc::new(Semaphore::new(0)),
                state: Mutex::new(State {
                    size: 0,
                    idle: Vec::new(),
                    last_used: Instant::now(),
                }),
            })
        })
        .clone();
    drop(registry);
    let mut state = pool.state();
    if state.size < size {
        pool.permits.add_permits(size - state.size);
        state.size = size;
    }
    drop(state);
    pool
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection: an idle one that is still open, or a new one from `connect`. Waits while
    /// all `size` are in use; the caller bounds the wait with the step's deadline.
    pub(super) async fn checkout<F>(
        self: &Arc<Self>,
        connect: F,
    ) -> Result<Pooled, keyrotd_plugin::ProviderError>
    where
        F: std::future::Future<Output = Result<Client, keyrotd_plugin::ProviderError>>,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let idle = {
            let mut state = self.state();
            state.last_used = Instant::now();
            let mut found = None;
            // Most recently returned first: the likeliest to be alive.
            while let Some((client, _)) = state.idle.pop() {
                if !client.is_closed() {
                    found = Some(client);
                    break;
                }
            }
            found
        };
        let (client, reused) = match idle {
            Some(client) => (client, true),
            None => (connect.await?, false),
        };
        Ok(Pooled {
            client: Some(client),
            pool: self.clone(),
            _permit: permit,
            reused,
        })
    }

    /// Closes every idle connection: after one turned out dead, the others likely are too (a
    /// server restart, a failover).
    pub(super) fn discard_idle(&self) {
        self.state().idle.clear();
    }

    /// Closes idle connections unused since `IDLE_TIMEOUT` before `now`, and closed ones; true
    /// when the pool is empty, idle since as long and none is checked out.
    fn prune(&self, now: Instant) -> bool {
        let mut state = self.state();
        state
            .idle
            .retain(|(client, since)| !client.is_closed() && now - *since < IDLE_TIMEOUT);
        state.idle.is_empty()
            && self.permits.available_permits() == state.size
            && now - state.last_used >= IDLE_TIMEOUT
    }
}

/// Closes idle connections as they expire, and forgets pools nobody used for as long; ends when
/// no pool is left.
async fn reap() {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let now = Instant::now();
        let mut registry = registry();
        registry.pools.retain(|_, pool| !pool.prune(now));
        if registry.pools.is_empty() {
            registry.reaper = None;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pools_grow_to_the_largest_size_asked_and_expire_when_idle() {
        let target = || Target {
            dsn: SecretString::from("host=unit-test-pool"),
            sslrootcert: None,
        };
        let a = pool(target(), 2);
        let b = pool(target(), 3);
        assert!(Arc::ptr_eq(&a, &b), "one pool per target");
        assert_eq!(a.permits.available_permits(), 3);
        let _ = pool(target(), 1);
        assert_eq!(a.permits.available_permits(), 3, "never shrinks");
        let held = a.permits.clone().acquire_owned().await.unwrap();
        assert!(
            !a.prune(Instant::now() + IDLE_TIMEOUT),
            "one is checked out"
        );
        drop(held);
        assert!(!a.prune(Instant::now()), "used just now");
        assert!(
            a.prune(Instant::now() + IDLE_TIMEOUT),
            "idle for IDLE_TIMEOUT"
        );
    }
}
