//! Metered wrappers around the plugins and the state store, so the engine's code stays about the
//! protocol:
//!
//! - [`TimedRotator`] and [`TimedStore`] time every provider call into
//!   `keyrotd_provider_call_duration_seconds{rotator,operation}` and
//!   `keyrotd_store_call_duration_seconds{store,operation}`; `operation` is the trait method's
//!   name, so label values stay bounded (kinds × methods);
//! - [`MeteredState`] sets `keyrotd_state_store_up` from the result of every state call (the
//!   scheduler asks the store for changes every few seconds, so it stays fresh while idle) and
//!   counts failures in `keyrotd_state_store_errors_total`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyrotd_plugin::{Attrs, Credential, ProviderError, Rotator, StepContext, Store};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry};

use crate::state::audit::{AuditFilter, AuditLine, Pruned};
use crate::state::chain::{Break, Intact};
use crate::state::{
    Busy, Claim, CommitCounts, CredentialRecord, JournalLine, RotationRecord, StateError,
    StateStore, StepRecord,
};

/// Buckets for provider and store calls: from a local file write to a slow cloud API.
const CALL_BUCKETS: [f64; 10] = [0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 120.0];

/// The call-latency histograms.
#[derive(Clone)]
pub struct CallMetrics {
    provider: HistogramVec,
    store: HistogramVec,
}

impl CallMetrics {
    /// Creates and registers the histograms.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let provider = HistogramVec::new(
            HistogramOpts::new(
                "keyrotd_provider_call_duration_seconds",
                "Duration of rotator calls, by rotator kind and operation (issue, activate, verify, abandon, revoke).",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["rotator", "operation"],
        )?;
        let store = HistogramVec::new(
            HistogramOpts::new(
                "keyrotd_store_call_duration_seconds",
                "Duration of store calls, by store kind and operation (current, stage, pending, promote, discard, release_previous).",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["store", "operation"],
        )?;
        registry.register(Box::new(provider.clone()))?;
        registry.register(Box::new(store.clone()))?;
        Ok(Self { provider, store })
    }
}

async fn timed<T>(histogram: &HistogramVec, labels: [&str; 2], call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let result = call.await;
    histogram
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

/// A rotator whose calls are timed.
pub struct TimedRotator {
    inner: Arc<dyn Rotator>,
    metrics: CallMetrics,
}

impl TimedRotator {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Rotator>, metrics: &CallMetrics) -> Arc<dyn Rotator> {
        Arc::new(Self {
            inner,
            metrics: metrics.clone(),
        })
    }

    async fn time<T>(&self, operation: &str, call: impl Future<Output = T>) -> T {
        timed(&self.metrics.provider, [self.inner.kind(), operation], call).await
    }
}

#[async_trait]
impl Rotator for TimedRotator {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn secret_field(&self) -> &str {
        self.inner.secret_field()
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        self.inner.public_attrs()
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    async fn issue(
        &self,
        ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        self.time("issue", self.inner.issue(ctx, current)).await
    }

    async fn activate(
        &self,
        ctx: StepContext<'_>,
        new: &Credential,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        self.time("activate", self.inner.activate(ctx, new, current))
            .await
    }

    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        self.time("verify", self.inner.verify(ctx, new)).await
    }

    async fn abandon(
        &self,
        ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        self.time("abandon", self.inner.abandon(ctx, issued, current))
            .await
    }

    async fn revoke(&self, ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        self.time("revoke", self.inner.revoke(ctx, old)).await
    }

    fn checks_use(&self) -> bool {
        self.inner.checks_use()
    }

    async fn last_used(
        &self,
        ctx: StepContext<'_>,
        old: &Attrs,
        since: std::time::SystemTime,
    ) -> Result<keyrotd_plugin::UsageReport, ProviderError> {
        self.time("last_used", self.inner.last_used(ctx, old, since))
            .await
    }
}

/// A store whose calls are timed.
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: CallMetrics,
}

impl TimedStore {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Store>, metrics: &CallMetrics) -> Arc<dyn Store> {
        Arc::new(Self {
            inner,
            metrics: metrics.clone(),
        })
    }

    async fn time<T>(&self, operation: &str, call: impl Future<Output = T>) -> T {
        timed(&self.metrics.store, [self.inner.kind(), operation], call).await
    }
}

#[async_trait]
impl Store for TimedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        self.time("current", self.inner.current(ctx)).await
    }

    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        self.time("stage", self.inner.stage(ctx, new)).await
    }

    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        self.time("pending", self.inner.pending(ctx)).await
    }

    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.time("promote", self.inner.promote(ctx)).await
    }

    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.time("discard", self.inner.discard(ctx)).await
    }

    async fn release_previous(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.time("release_previous", self.inner.release_previous(ctx))
            .await
    }

    async fn last_rotation(&self, ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        self.time("last_rotation", self.inner.last_rotation(ctx))
            .await
    }
}

/// The state store's health metrics.
#[derive(Clone)]
pub struct StateMetrics {
    up: IntGauge,
    errors: IntCounter,
    commits: IntCounter,
    writes: IntCounter,
}

impl StateMetrics {
    /// Creates and registers the metrics; `up` starts at 0 until a call succeeds.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let up = IntGauge::new(
            "keyrotd_state_store_up",
            "1 if the last call to the state store succeeded, 0 if it failed.",
        )?;
        let errors = IntCounter::new(
            "keyrotd_state_store_errors_total",
            "Failed calls to the state store.",
        )?;
        let commits = IntCounter::new(
            "keyrotd_state_commits_total",
            "Write transactions the state store committed (each one fsync); with group commit, many writes share one.",
        )?;
        let writes = IntCounter::new(
            "keyrotd_state_writes_total",
            "Writes the state store committed (steps, saves, leases).",
        )?;
        for metric in [&errors, &commits, &writes] {
            registry.register(Box::new(metric.clone()))?;
        }
        registry.register(Box::new(up.clone()))?;
        Ok(Self {
            up,
            errors,
            commits,
            writes,
        })
    }

    fn record<T>(&self, result: Result<T, StateError>) -> Result<T, StateError> {
        match &result {
            // A lost lease is another process's doing, not the store failing.
            Ok(_) | Err(StateError::LeaseLost(_)) => self.up.set(1),
            Err(_) => {
                self.up.set(0);
                self.errors.inc();
            }
        }
        result
    }
}

/// A state store whose calls update [`StateMetrics`].
pub struct MeteredState {
    inner: Arc<dyn StateStore>,
    metrics: StateMetrics,
    /// The inner store's counts already added to the counters.
    seen: [AtomicU64; 2],
}

impl MeteredState {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn StateStore>, metrics: StateMetrics) -> Arc<dyn StateStore> {
        let seen = Default::default();
        Arc::new(Self {
            inner,
            metrics,
            seen,
        })
    }

    /// Records a call's result, and brings the commit counters up to the inner store's counts.
    fn done<T>(&self, result: Result<T, StateError>) -> Result<T, StateError> {
        let CommitCounts { commits, writes } = self.inner.commit_counts();
        let counters = [&self.metrics.commits, &self.metrics.writes];
        for ((now, seen), counter) in [commits, writes].into_iter().zip(&self.seen).zip(counters) {
            // Concurrent calls each add only what no other call has added yet.
            let before = seen.fetch_max(now, Ordering::Relaxed);
            if now > before {
                counter.inc_by(now - before);
            }
        }
        self.metrics.record(result)
    }
}

#[async_trait]
impl StateStore for MeteredState {
    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StateError> {
        self.done(self.inner.credentials().await)
    }

    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StateError> {
        self.done(self.inner.credential(id).await)
    }

    async fn put_credential(&self, record: &CredentialRecord) -> Result<(), StateError> {
        self.done(self.inner.put_credential(record).await)
    }

    async fn ensure_credentials(&self, ids: &[String]) -> Result<(), StateError> {
        self.done(self.inner.ensure_credentials(ids).await)
    }

    async fn open_rotations(&self) -> Result<Vec<RotationRecord>, StateError> {
        self.done(self.inner.open_rotations().await)
    }

    async fn open_rotation(
        &self,
        credential_id: &str,
    ) -> Result<Option<RotationRecord>, StateError> {
        self.done(self.inner.open_rotation(credential_id).await)
    }

    async fn begin(&self, rotation: &RotationRecord) -> Result<Result<(), Busy>, StateError> {
        self.done(self.inner.begin(rotation).await)
    }

    fn owner(&self) -> &str {
        self.inner.owner()
    }

    async fn claim(
        &self,
        rotation_id: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Claim, StateError> {
        self.done(self.inner.claim(rotation_id, lease_until, now).await)
    }

    async fn renew(&self, rotation_id: &str, lease_until: i64) -> Result<bool, StateError> {
        self.done(self.inner.renew(rotation_id, lease_until).await)
    }

    async fn save(
        &self,
        rotation: &RotationRecord,
        credential: &CredentialRecord,
    ) -> Result<(), StateError> {
        self.done(self.inner.save(rotation, credential).await)
    }

    async fn record(
        &self,
        rotation_id: &str,
        lines: &[JournalLine],
        save: Option<(&RotationRecord, &CredentialRecord)>,
    ) -> Result<(), StateError> {
        self.done(self.inner.record(rotation_id, lines, save).await)
    }

    fn commit_counts(&self) -> CommitCounts {
        self.inner.commit_counts()
    }

    async fn audit_lines(&self, filter: &AuditFilter) -> Result<Vec<AuditLine>, StateError> {
        self.done(self.inner.audit_lines(filter).await)
    }

    async fn verify_journal(&self) -> Result<Result<Intact, Break>, StateError> {
        self.done(self.inner.verify_journal().await)
    }

    async fn prune(&self, before: i64) -> Result<Pruned, StateError> {
        self.done(self.inner.prune(before).await)
    }

    async fn history(
        &self,
        credential_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RotationRecord, Vec<StepRecord>)>, StateError> {
        self.done(self.inner.history(credential_id, limit).await)
    }

    async fn steps(&self, rotation_id: &str, step: &str) -> Result<Vec<StepRecord>, StateError> {
        self.done(self.inner.steps(rotation_id, step).await)
    }

    async fn external_version(&self) -> Result<i64, StateError> {
        self.done(self.inner.external_version().await)
    }

    async fn knows_rotation(
        &self,
        credential_id: &str,
        rotation_id: &str,
    ) -> Result<bool, StateError> {
        self.done(self.inner.knows_rotation(credential_id, rotation_id).await)
    }

    async fn adopt(
        &self,
        adopted: &RotationRecord,
        credential: &CredentialRecord,
        now: i64,
    ) -> Result<Result<Option<RotationRecord>, Busy>, StateError> {
        self.done(self.inner.adopt(adopted, credential, now).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SqliteState;

    #[tokio::test]
    async fn state_health_follows_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        SqliteState::open(&path).unwrap();
        let registry = Registry::new();
        let metrics = StateMetrics::register(&registry).unwrap();
        // A read-only connection: reads work, writes fail like a broken disk would.
        let read_only: Arc<dyn StateStore> =
            Arc::new(SqliteState::open_read_only(&path).unwrap().unwrap());
        let state = MeteredState::wrap(read_only, metrics.clone());
        assert_eq!(metrics.up.get(), 0, "unknown until the first call");

        state.credentials().await.unwrap();
        assert_eq!((metrics.up.get(), metrics.errors.get()), (1, 0));
        state
            .put_credential(&CredentialRecord::new("db"))
            .await
            .unwrap_err();
        assert_eq!((metrics.up.get(), metrics.errors.get()), (0, 1));
        state.external_version().await.unwrap();
        assert_eq!((metrics.up.get(), metrics.errors.get()), (1, 1));
    }
}
