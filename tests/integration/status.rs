//! `keyrotd status` through the real binary: during a grace period the next rotation and the
//! pending revoke are two columns (`NEXT ROTATION`, `REVOKE AT`) and two JSON fields
//! (`next_rotation`, `revoke_at`), each with its own time.

use crate::support;

use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use support::*;

/// Two credentials rotated every day: `grace` keeps its old value for 2 hours, `done` has no
/// grace, so its rotation is over when `keyrotd rotate` returns.
fn inventory(dir: &Path) -> std::path::PathBuf {
    let mut text = String::from("[daemon]\nstate = \"sqlite:state/state.db\"\n\n");
    for (id, grace) in [("grace", "2h"), ("done", "0s")] {
        text.push_str(&format!(
            "[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\" }}\n\
             store = {{ kind = \"file\", path = \"{}\" }}\n\
             rotate_every = \"1d\"\nmax_age = \"2d\"\ngrace = \"{grace}\"\n\n",
            dir.join(format!("out/{id}")).display()
        ));
    }
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn time(value: &serde_json::Value) -> Option<DateTime<Utc>> {
    value.as_str().map(|t| t.parse().unwrap())
}

/// The table's cell under `column` in the row of credential `id`, cut at the header's columns.
fn cell(table: &str, id: &str, column: &str) -> String {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let start = header.find(column).unwrap_or_else(|| panic!("{table}"));
    let end = header[start + column.len()..]
        .find(|c: char| c != ' ')
        .map_or(header.len(), |gap| start + column.len() + gap);
    let row = lines
        .find(|l| l.starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("no row {id}:\n{table}"));
    row[start..end.min(row.len())].trim().to_owned()
}

#[test]
fn status_shows_the_next_rotation_and_the_pending_revoke_apart() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path());
    for id in ["grace", "done"] {
        let out = cli(&config, &["rotate", id]);
        assert!(out.status.success(), "{out:?}");
    }

    let out = cli(&config, &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    let grace = row("grace");
    assert_eq!(grace["state"], "grace", "{grace}");
    let last = time(&grace["last_rotation"]).expect("last_rotation");
    let next = time(&grace["next_rotation"]).expect("next_rotation");
    let revoke = time(&grace["revoke_at"]).expect("revoke_at");
    // The revoke is promotion + grace, rounded up to the second; the next rotation is a day
    // after the last, not the revoke time.
    assert_eq!(next, last + Duration::days(1), "{grace}");
    assert!(
        revoke >= last + Duration::hours(2)
            && revoke <= last + Duration::hours(2) + Duration::seconds(2),
        "{grace}"
    );
    let done = row("done");
    assert_eq!(done["state"], "idle", "{done}");
    assert!(done["revoke_at"].is_null(), "{done}");
    assert_eq!(
        time(&done["next_rotation"]),
        time(&done["last_rotation"]).map(|t| t + Duration::days(1)),
        "{done}"
    );

    let out = cli(&config, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let shown = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
    assert_eq!(
        cell(&table, "grace", "NEXT ROTATION"),
        shown(next),
        "{table}"
    );
    assert_eq!(cell(&table, "grace", "REVOKE AT"), shown(revoke), "{table}");
    assert_eq!(cell(&table, "done", "REVOKE AT"), "-", "{table}");
    assert_eq!(cell(&table, "grace", "STATE"), "grace", "{table}");
}
