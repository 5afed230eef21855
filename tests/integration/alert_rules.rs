//! The shipped Prometheus rules (prometheus/keyrotd.rules.yml) are valid and pass their unit tests.
//!
//! Needs `promtool` (Debian package `prometheus`); a missing promtool fails the test, it is
//! never skipped.

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus");
    let output = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); install it with `apt-get install -y prometheus`")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    assert!(
        text.contains("SUCCESS"),
        "promtool {} printed no SUCCESS:\n{text}",
        args.join(" ")
    );
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn rules_file_is_valid() {
    promtool(&["check", "rules", "keyrotd.rules.yml"]);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "keyrotd.rules.test.yml"]);
}

/// `daemon.metrics = "compact"` exports a credential's series only while it needs attention:
/// the same rules fire on them and resolve when they leave the scrape.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn rules_pass_their_compact_mode_unit_tests() {
    promtool(&["test", "rules", "keyrotd.rules.compact.test.yml"]);
}

#[test]
fn every_contract_alert_is_shipped_and_tested() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus");
    let rules = std::fs::read_to_string(dir.join("keyrotd.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("keyrotd.rules.test.yml")).unwrap();
    for alert in [
        "KeyrotdCredentialStale",
        "KeyrotdRotationFailing",
        "KeyrotdCredentialFailed",
        "KeyrotdRotationOverdue",
        "KeyrotdAbsent",
        "KeyrotdStateStoreDown",
        "KeyrotdRevokeDelayed",
        "KeyrotdHookFailing",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}")),
            "{alert} missing from the rules"
        );
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
    }
}
