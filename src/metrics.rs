//! The Prometheus exposition.
//!
//! Process-wide metrics (rotations, step durations, build info) live in an owned `Registry`.
//! Per-credential series are not stored as metric objects at all: they are rendered at scrape
//! time from the scheduler's live table, a chunk of credentials at a time, so 100,000 credentials
//! cost no memory between scrapes and a bounded amount during one.
//!
//! Invariant: label values are credential ids (validated to `[A-Za-z0-9._-]`), rotator kinds,
//! states and steps: never secret material or error text.

use std::fmt::Write;
use std::sync::Arc;

use chrono::Utc;
use prometheus::{
    Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::MetricsMode;
use crate::engine::EngineMetrics;
use crate::instrument::StateMetrics;
use crate::scheduler::{lock, Live, SchedulerMetrics, Slot, Table};
use crate::state::Status;

/// Credentials rendered per chunk of the streamed response.
const CHUNK: usize = 2000;

/// The daemon's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The process-wide registry, rendered before the per-credential series.
    pub registry: Registry,
    /// Rotations, steps and provider calls.
    pub engine: EngineMetrics,
    /// Engine runs that panicked.
    pub scheduler: SchedulerMetrics,
    /// The state store's health.
    pub state: StateMetrics,
    /// Inventory loads and reloads.
    pub config: ConfigMetrics,
}

/// How the inventory was loaded: at start-up, and on each SIGHUP reload.
#[derive(Clone)]
pub struct ConfigMetrics {
    /// When the inventory was last loaded successfully (Unix seconds).
    pub last_success: Gauge,
    /// Whether the last load or reload succeeded (1) or was refused (0).
    pub last_successful: IntGauge,
    /// Reloads by result.
    pub reloads: IntCounterVec,
}

impl ConfigMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let last_success = Gauge::new(
            "keyrotd_config_last_reload_success_timestamp_seconds",
            "When the inventory was last loaded successfully (Unix time); start-up counts.",
        )?;
        let last_successful = IntGauge::new(
            "keyrotd_config_last_reload_successful",
            "1 if the last attempt to load the inventory succeeded.",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "keyrotd_config_reloads_total",
                "Inventory reloads after start-up, by result (success, failure).",
            ),
            &["result"],
        )?;
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(last_successful.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Self {
            last_success,
            last_successful,
            reloads,
        })
    }

    /// Records a reload attempt.
    pub fn reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
        if success {
            self.loaded();
        } else {
            self.last_successful.set(0);
        }
    }

    /// Records a successful load now.
    pub fn loaded(&self) {
        self.last_success
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        self.last_successful.set(1);
    }
}

impl Metrics {
    /// Creates the registry and the process-wide metrics.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let engine = EngineMetrics::register(&registry)?;
        let scheduler = SchedulerMetrics::register(&registry)?;
        let build = IntGaugeVec::new(
            Opts::new(
                "keyrotd_build_info",
                "Always 1; labelled with the running version.",
            ),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let state = StateMetrics::register(&registry)?;
        let config = ConfigMetrics::register(&registry)?;
        Ok(Self {
            registry,
            engine,
            scheduler,
            state,
            config,
        })
    }

    /// The registry part of the exposition.
    pub fn render_registry(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }
}

/// One per-credential metric family.
#[derive(Clone, Copy)]
enum Family {
    Issued,
    MaxAge,
    NextRotation,
    Status,
    Failures,
    OldLastUsed,
    RevokeDeadline,
}

impl Family {
    const ALL: [Family; 7] = [
        Self::Issued,
        Self::MaxAge,
        Self::NextRotation,
        Self::Status,
        Self::Failures,
        Self::OldLastUsed,
        Self::RevokeDeadline,
    ];

    fn header(self) -> (&'static str, &'static str) {
        match self {
            Self::Issued => (
                "keyrotd_credential_issued_timestamp_seconds",
                "When the current credential was promoted (Unix time).",
            ),
            Self::MaxAge => (
                "keyrotd_credential_max_age_seconds",
                "Age past which the credential is stale.",
            ),
            Self::NextRotation => (
                "keyrotd_credential_next_rotation_timestamp_seconds",
                "When the next rotation (or revocation) is due (Unix time).",
            ),
            Self::Status => (
                "keyrotd_credential_status",
                "1 for the credential's current state (idle, rotating, grace, retrying, failed, \
                 revoke_delayed).",
            ),
            Self::Failures => (
                "keyrotd_credential_consecutive_failures",
                "Failed attempts since the last success.",
            ),
            Self::OldLastUsed => (
                "keyrotd_credential_old_last_used_timestamp_seconds",
                "While the revoke waits for the old credential to go unused: when its provider \
                 last saw it used (Unix time).",
            ),
            Self::RevokeDeadline => (
                "keyrotd_credential_revoke_deadline_timestamp_seconds",
                "While the revoke waits for the old credential to go unused: when \
                 max_revoke_delay passes (Unix time).",
            ),
        }
    }
}

/// When the credential's next rotation (or revocation) is due, in Unix seconds: its heap wake-up
/// or its cron group's next fire, whichever is first. A failed credential waits for an operator,
/// so its cron schedule does not count.
fn next_rotation(slot: &Slot<'_>, live: &Live, group_fire: &[Option<i64>]) -> Option<i64> {
    let cron = slot
        .group
        .and_then(|g| group_fire[g])
        .filter(|_| live.status != Status::Failed);
    match (live.wake, cron) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether the revoke waits for the old credential to go unused.
fn waiting(live: &Live) -> bool {
    live.status == Status::RevokeDelayed
}

/// While the revoke waits: when `max_revoke_delay` passes, counted from the end of the grace
/// period after the promotion.
fn revoke_deadline(slot: &Slot<'_>, live: &Live) -> Option<i64> {
    let promoted = live.issued_at.filter(|_| waiting(live))?;
    Some(slot.spec.revoke.deadline(promoted, slot.spec.grace))
}

/// Whether the credential is older than its `max_age` (a `max_age` of 0 never is), or past
/// its expiry (a certificate's notAfter).
fn is_stale(slot: &Slot<'_>, live: &Live, now: i64) -> bool {
    let by_age = slot.spec.max_age.as_secs() > 0 || live.expires_at.is_some();
    by_age && live.stale_at(slot.spec).is_some_and(|t| now > t)
}

/// Whether a credential needs attention, so compact mode exports its series: it is stale, due or
/// overdue, rotating, retrying or failed, or has failed attempts. This covers every input of the
/// per-credential alert rules in `prometheus/keyrotd.rules.yml` (stale, overdue, failing,
/// failed): a rule can only match a credential in this set, so leaving the others out changes no
/// alert.
fn needs_attention(slot: &Slot<'_>, live: &Live, next: Option<i64>, now: i64) -> bool {
    !matches!(live.status, Status::Idle | Status::Grace)
        || live.consecutive_failures > 0
        || next.is_some_and(|t| t <= now)
        || is_stale(slot, live, now)
}

/// The per-credential part of the exposition, as a sequence of text chunks: first the counts
/// (credentials per state, stale credentials, credentials left out), then the per-credential
/// families, for every credential ([`MetricsMode::Full`]) or only those that need attention
/// ([`MetricsMode::Compact`], chosen once at the start of the scrape).
pub fn credential_chunks(
    table: Arc<Table>,
    mode: MetricsMode,
) -> impl Iterator<Item = String> + Send {
    let at = Utc::now();
    let now = at.timestamp();
    // Credentials share a few cron schedules: compute each group's next fire once per scrape.
    let group_fire: Vec<Option<i64>> = table
        .groups
        .iter()
        .map(|g| g.schedule.next_after(at).map(|t| t.timestamp()))
        .collect();
    let mut by_state = [0usize; Status::ALL.len()];
    let mut stale = 0usize;
    let mut selected: Vec<usize> = Vec::new();
    for i in 0..table.len() {
        let slot = table.slot(i);
        let live: Live = *lock(slot.live);
        if let Some(s) = Status::ALL.iter().position(|s| *s == live.status) {
            by_state[s] += 1;
        }
        stale += usize::from(is_stale(&slot, &live, now));
        let next = next_rotation(&slot, &live, &group_fire);
        if mode == MetricsMode::Full || needs_attention(&slot, &live, next, now) {
            selected.push(i);
        }
    }
    let mut counts = String::new();
    let _ = writeln!(
        counts,
        "# HELP keyrotd_credentials Credentials in each state.\n# TYPE keyrotd_credentials gauge"
    );
    for (state, n) in Status::ALL.iter().zip(by_state) {
        let _ = writeln!(
            counts,
            "keyrotd_credentials{{state=\"{}\"}} {n}",
            state.as_str()
        );
    }
    let _ = writeln!(
        counts,
        "# HELP keyrotd_credentials_stale Credentials older than their max_age.\n\
         # TYPE keyrotd_credentials_stale gauge\nkeyrotd_credentials_stale {stale}\n\
         # HELP keyrotd_credentials_series_omitted Credentials whose per-credential series are left \
         out (daemon.metrics = \"compact\"; 0 in full mode).\n\
         # TYPE keyrotd_credentials_series_omitted gauge\nkeyrotd_credentials_series_omitted {}",
        table.len() - selected.len()
    );
    let selected = Arc::new(selected);
    let chunks = selected.len().div_ceil(CHUNK);
    std::iter::once(counts).chain(Family::ALL.into_iter().flat_map(move |family| {
        let (table, group_fire, selected) = (table.clone(), group_fire.clone(), selected.clone());
        (0..chunks.max(1)).map(move |c| {
            let mut out = String::with_capacity(CHUNK * 128);
            if c == 0 {
                let (name, help) = family.header();
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            }
            let end = ((c + 1) * CHUNK).min(selected.len());
            for slot in selected[(c * CHUNK).min(end)..end]
                .iter()
                .map(|&i| table.slot(i))
            {
                let live: Live = *lock(slot.live);
                let (id, kind) = (&slot.spec.id, slot.spec.rotator.kind());
                let (name, _) = family.header();
                let labels = format!("credential=\"{id}\",rotator=\"{kind}\"");
                match family {
                    Family::Issued => {
                        if let Some(t) = live.issued_at {
                            let _ = writeln!(out, "{name}{{{labels}}} {t}");
                        }
                    }
                    Family::MaxAge => {
                        let _ =
                            writeln!(out, "{name}{{{labels}}} {}", live.max_age_secs(slot.spec));
                    }
                    Family::NextRotation => {
                        if let Some(t) = next_rotation(&slot, &live, &group_fire) {
                            let _ = writeln!(out, "{name}{{{labels}}} {t}");
                        }
                    }
                    Family::Status => {
                        for state in Status::ALL {
                            let v = u8::from(state == live.status);
                            let _ = writeln!(
                                out,
                                "{name}{{{labels},state=\"{}\"}} {v}",
                                state.as_str()
                            );
                        }
                    }
                    Family::Failures => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", live.consecutive_failures);
                    }
                    Family::OldLastUsed => {
                        if let Some(t) = live.old_last_used.filter(|_| waiting(&live)) {
                            let _ = writeln!(out, "{name}{{{labels}}} {t}");
                        }
                    }
                    Family::RevokeDeadline => {
                        if let Some(t) = revoke_deadline(&slot, &live) {
                            let _ = writeln!(out, "{name}{{{labels}}} {t}");
                        }
                    }
                }
            }
            out
        })
    }))
}
