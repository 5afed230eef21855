//! The engine's Prometheus metrics: rotations by result, step durations, provider call latency
//! and the lost-state flag, registered in the daemon's owned registry.
//!
//! Invariant: label values are results, step names and credential ids, never secrets.

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};

use crate::instrument::CallMetrics;
use crate::protocol::Step;

/// The engine's metrics, owned by the daemon's registry.
#[derive(Clone)]
pub struct EngineMetrics {
    /// `keyrotd_rotations_total{result}`: rotations finished, by result.
    pub rotations: IntCounterVec,
    /// `keyrotd_rotation_step_duration_seconds{step}`: how long protocol steps take.
    pub step_seconds: HistogramVec,
    /// Provider and store call latency.
    pub calls: CallMetrics,
    /// 1 for each credential whose store names a rotation the state database does not know.
    pub state_mismatch: IntGaugeVec,
    /// `keyrotd_hook_runs_total{credential,kind,result}`: delivery hook attempts.
    pub hook_runs: IntCounterVec,
    /// `keyrotd_hook_last_failure_timestamp_seconds{credential,kind,hook}`: when a hook (`hook`:
    /// `promote:0`, when it runs and its index) last failed.
    pub hook_last_failure: IntGaugeVec,
    /// `keyrotd_hook_last_success_timestamp_seconds{credential,kind,hook}`: when a hook last
    /// succeeded.
    pub hook_last_success: IntGaugeVec,
}

impl EngineMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let rotations = IntCounterVec::new(
            prometheus::Opts::new(
                "keyrotd_rotations_total",
                "Rotations finished, by result (success, failed, rolled_back).",
            ),
            &["result"],
        )?;
        let step_seconds = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "keyrotd_rotation_step_duration_seconds",
                "Duration of rotation protocol steps.",
            )
            .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
            &["step"],
        )?;
        for result in ["success", "failed", "rolled_back"] {
            rotations.with_label_values(&[result]);
        }
        for step in Step::ALL {
            step_seconds.with_label_values(&[step.as_str()]);
        }
        let state_mismatch = IntGaugeVec::new(
            prometheus::Opts::new(
                "keyrotd_state_mismatch",
                "1 while the credential's store names a rotation the state database does not know (state lost or foreign); automation is stopped until `keyrotd adopt`.",
            ),
            &["credential"],
        )?;
        registry.register(Box::new(rotations.clone()))?;
        registry.register(Box::new(step_seconds.clone()))?;
        registry.register(Box::new(state_mismatch.clone()))?;
        let hook_runs = IntCounterVec::new(
            prometheus::Opts::new(
                "keyrotd_hook_runs_total",
                "Delivery hook attempts, by credential, hook kind and result (ok, error, timeout).",
            ),
            &["credential", "kind", "result"],
        )?;
        let hook_last_failure = IntGaugeVec::new(
            prometheus::Opts::new(
                "keyrotd_hook_last_failure_timestamp_seconds",
                "When a delivery hook of the credential last failed (Unix seconds); hook is when it runs and its index (promote:0).",
            ),
            &["credential", "kind", "hook"],
        )?;
        let hook_last_success = IntGaugeVec::new(
            prometheus::Opts::new(
                "keyrotd_hook_last_success_timestamp_seconds",
                "When a delivery hook of the credential last succeeded (Unix seconds); hook is when it runs and its index (promote:0).",
            ),
            &["credential", "kind", "hook"],
        )?;
        registry.register(Box::new(hook_runs.clone()))?;
        registry.register(Box::new(hook_last_failure.clone()))?;
        registry.register(Box::new(hook_last_success.clone()))?;
        Ok(Self {
            rotations,
            step_seconds,
            calls: CallMetrics::register(registry)?,
            state_mismatch,
            hook_runs,
            hook_last_failure,
            hook_last_success,
        })
    }
}
