//! How long plugin calls may take. Each call is bounded by its own plugin's `timeout` (a hung
//! rotator fails after the rotator's timeout, not after the sum of both), and a step by the
//! deadline of the plugins it calls; past it the call is dropped and fails as transient.

use std::time::Duration;

use keyrotd_plugin::ProviderError;

use super::{Engine, Job};
use crate::protocol::Step;

/// How long one plugin may take to answer one call (its `timeout`), and its name for the error.
pub(super) type Limit = (Duration, String);

pub(super) trait PluginLimit {
    fn rotator(job: &Job<'_>) -> Limit;
    fn store(job: &Job<'_>) -> Limit;
}

impl PluginLimit for Limit {
    fn rotator(job: &Job<'_>) -> Limit {
        let kind = job.rotator.kind();
        (job.rotator.timeout(), format!("rotator `{kind}`"))
    }
    fn store(job: &Job<'_>) -> Limit {
        (job.store.timeout(), format!("store `{}`", job.store.kind()))
    }
}

/// Runs one plugin call for at most its plugin's limit: a step that calls both plugins is bounded
/// call by call, so a hung rotator fails after the rotator's `timeout`, not after the sum.
pub(super) async fn within<T>(
    (limit, plugin): Limit,
    call: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(ProviderError::no_answer(plugin, limit)))
}

impl Engine {
    /// How long `step` may wait for the plugins it calls (their `timeout`s), and which they are.
    pub(super) fn deadline(job: &Job<'_>, step: Step) -> (Duration, String) {
        let (rotator, store) = (Limit::rotator(job), Limit::store(job));
        match step {
            Step::Revoke | Step::CheckUse => rotator,
            Step::Stage | Step::Promote | Step::Release | Step::Discard => store,
            // These steps call both: each reads the store (the current or the staged value)
            // before it calls the rotator, each call within its own plugin's limit.
            // A hook bounds each attempt by its own `timeout` (at most an hour, its process group
            // killed); this only backs that up.
            Step::Notify => (Duration::from_secs(3660), "delivery hook".into()),
            Step::Issue | Step::Activate | Step::Verify | Step::Rollback => (
                rotator.0.saturating_add(store.0),
                format!("{} and {}", rotator.1, store.1),
            ),
        }
    }

    /// Runs a call to `plugins` for at most `deadline`: past it the call is dropped (closing its
    /// connections) and fails as transient, so a provider that accepts the connection and never
    /// answers cannot hang a rotation, whatever its plugin does itself. `None` when the abort
    /// token interrupted it.
    pub(super) async fn bounded<T>(
        &self,
        (deadline, plugins): (Duration, String),
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Option<Result<T, ProviderError>> {
        tokio::select! {
            biased;
            () = self.abort.cancelled() => None,
            result = tokio::time::timeout(deadline, call) => Some(
                result.unwrap_or_else(|_| Err(ProviderError::no_answer(plugins, deadline))),
            ),
        }
    }
}
