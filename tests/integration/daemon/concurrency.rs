//! Many `keyrotd rotate` processes at once beside a running daemon: every rotation's journal
//! keeps the protocol's order.

use super::*;

/// Checks one rotation's journal for an order that the protocol forbids. `grace_ms` is the
/// configured grace period.
fn impossible_order(
    rotation: &keyrotd::state::RotationRecord,
    steps: &[keyrotd::state::StepRecord],
    grace_ms: i64,
) -> Option<String> {
    let mut promoted_at = None;
    let mut open_step: Option<&str> = None;
    for s in steps {
        let at = format!("{} {} at {}", s.step, s.event, s.at_ms);
        if let Some(promoted) = promoted_at {
            if !matches!(s.step.as_str(), "revoke" | "release") {
                return Some(format!("{at} after promote ok"));
            }
            if s.event == "start" && s.at_ms < promoted + grace_ms {
                return Some(format!(
                    "{at}: inside the grace period (promoted at {promoted})"
                ));
            }
        }
        match (open_step, s.event.as_str()) {
            (None, "start") => open_step = Some(&s.step),
            (Some(open), "ok" | "error" | "interrupted") if open == s.step => open_step = None,
            (open, _) => {
                return Some(format!(
                    "{at} while {open:?} was running: two drivers at once"
                ))
            }
        }
        if s.step == "promote" && s.event == "ok" {
            promoted_at = Some(s.at_ms);
        }
    }
    let promoted = promoted_at.is_some();
    match rotation.phase {
        keyrotd::protocol::Phase::RolledBack if promoted => {
            Some("rolled back after promote ok".into())
        }
        keyrotd::protocol::Phase::Done if !promoted => Some("done without promote ok".into()),
        _ => None,
    }
}

/// Many `keyrotd rotate` processes at once beside a running daemon, on three credentials: no
/// rotation is driven by two processes, none is rolled back or re-staged after promotion, and no
/// old credential is revoked inside its grace period. Intermittent by nature, so it runs several
/// rounds; every rotation's journal is checked.
#[test]
fn concurrent_rotations_never_break_the_protocol_order() {
    const GRACE_MS: i64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut text =
        format!("[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n");
    for id in ["a", "b", "c"] {
        text += &format!(
            "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
             store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n\
             rotate_every = \"2s\"\nmax_age = \"1h\"\ngrace = \"{GRACE_MS}ms\"\n",
            dir.path().join(format!("out/{id}.json")).display()
        );
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"), &[]);
    for round in 0..6 {
        let children: Vec<_> = (0..20)
            .map(|i| {
                keyrotd()
                    .env("KEYROTD_LOG", "warn")
                    .arg("--config")
                    .arg(&config)
                    .args(["rotate", ["a", "b", "c"][(i + round) % 3]])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut child in children {
            let status = child.wait().unwrap();
            assert!(
                status.code().is_some(),
                "a rotate process crashed: {status}"
            );
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));

    let state = keyrotd::state::SqliteState::open_read_only(&dir.path().join("state/keyrotd.db"))
        .unwrap()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let history = runtime
        .block_on(keyrotd::state::StateStore::history(&state, None, 100_000))
        .unwrap();
    let done = history
        .iter()
        .filter(|(r, _)| r.phase == keyrotd::protocol::Phase::Done)
        .count();
    assert!(
        done >= 6,
        "rotations completed: {done}\n{}",
        daemon.log_text()
    );
    for (rotation, steps) in &history {
        if let Some(problem) = impossible_order(rotation, steps, GRACE_MS) {
            let journal: Vec<String> = steps
                .iter()
                .map(|s| format!("{} {} {}", s.at_ms, s.step, s.event))
                .collect();
            panic!(
                "rotation {} of {}: {problem}\n{}",
                rotation.id,
                rotation.credential_id,
                journal.join("\n")
            );
        }
    }
    // One open rotation per credential at a time: a credential's rotations never overlap.
    for id in ["a", "b", "c"] {
        let mut spans: Vec<(i64, i64)> = history
            .iter()
            .filter(|(r, s)| r.credential_id == id && !s.is_empty())
            .map(|(_, s)| (s[0].at_ms, s[s.len() - 1].at_ms))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{id}: overlapping rotations {pair:?}"
            );
        }
    }
}
