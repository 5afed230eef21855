//! The crash-test hook (`KEYROTD_FAILPOINT=step:event`): `tests/integration/daemon/` kills the
//! process at each step boundary it names.
//!
//! Invariant: unset, it changes nothing and costs one load. (`STEP:EVENT:uncommitted`, a crash
//! inside the state store's group commit, is the state module's.)

/// Crash testing: with `KEYROTD_FAILPOINT=STEP:EVENT` (`stage:start`, `stage:done` — the step ran
/// but is not journaled yet — or `stage:ok`), the process announces the point on stderr and
/// hangs there, so a test can `kill -9` it at exactly that point. Unset, this costs one load.
pub(super) async fn failpoint(step: &str, event: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("KEYROTD_FAILPOINT").ok());
    if point
        .as_deref()
        .is_some_and(|p| p.split_once(':') == Some((step, event)))
    {
        eprintln!("keyrotd: failpoint {step}:{event} reached; hanging until killed");
        std::future::pending::<()>().await;
    }
}
