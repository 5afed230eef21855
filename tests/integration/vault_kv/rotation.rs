//! Full rotations into KV v2 and KV v1 with exactly the printed policy, a reader of the latest
//! version throughout, the round trips of one KV v2 rotation, and retention.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;

/// One observation: the password and the rotation named by `keyrotd_rotation`.
type Seen = (String, Option<String>);

/// Reads the latest value of the secret every 10 ms, straight from OpenBao, and keeps each
/// distinct (password, writing rotation) it saw, in order.
struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Seen>>>,
}

impl Reader {
    fn start(fx: &Fixture) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (addr, root) = (fx.bao.addr.clone(), fx.bao.root_token().to_owned());
        let (api, kv) = match fx.kv {
            2 => (format!("{}/data/{}", fx.mount, fx.path), 2),
            _ => (format!("{}/{}", fx.mount, fx.path), 1),
        };
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<Seen> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let (status, body) = vault_get(&addr, &root, &api);
                assert_eq!(status, 200, "the secret is always readable: {body}");
                let data = if kv == 2 {
                    &body["data"]["data"]
                } else {
                    &body["data"]
                };
                let now = (
                    data["password"].as_str().unwrap().to_owned(),
                    data["keyrotd_rotation"].as_str().map(str::to_owned),
                );
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Two rotations (logging at trace, then at debug) with a reader polling; returns the round
/// trips of the first and the passwords they wrote.
fn two_rotations(fx: &Fixture) -> (Vec<String>, Vec<String>) {
    let reader = Reader::start(fx);
    std::thread::sleep(Duration::from_millis(100));
    fx.proxy.reset();
    let out = fx.rotate();
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    let first_trips = fx.proxy.seen();
    let (p1, r1, _) = fx.latest();
    let out = fx.cli_at("debug", &["rotate", "app"]);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    let (p2, r2, _) = fx.latest();
    std::thread::sleep(Duration::from_millis(100));
    let observed = reader.finish();

    let history = fx.history();
    let (r1, r2) = (
        r1.expect("rotation id written"),
        r2.expect("rotation id written"),
    );
    for rotation in [&r1, &r2] {
        assert!(
            history.contains(&format!("{rotation}  app  done  ")),
            "{history}"
        );
    }
    assert!(p1 != fx.p0 && p2 != p1 && p2.len() == 40);
    // The reader saw only P0 and the promoted values, each under the rotation that verified it.
    let allowed = [
        (fx.p0.clone(), None),
        (p1.clone(), Some(r1.clone())),
        (p2.clone(), Some(r2.clone())),
    ];
    assert!(observed.len() >= 2, "{} observations", observed.len());
    for seen in &observed {
        assert!(allowed.contains(seen), "a reader saw an unpromoted value");
    }
    let verified_before_promote = |rotation: &str| {
        let block = history.split(rotation).nth(1).unwrap_or_default();
        let verify = block.find("verify    ok");
        let promote = block.find("promote   ok");
        verify.is_some() && promote.is_some() && verify < promote
    };
    assert!(
        verified_before_promote(&r1) && verified_before_promote(&r2),
        "{history}"
    );
    assert!(fx.read(".pending").is_none(), "nothing left staged");
    let (object, _) = fx.read("").unwrap();
    assert_eq!(object["host"], "db.internal", "other members are kept");
    (first_trips, vec![p1, p2])
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_rotations_with_the_printed_policy_show_readers_only_verified_values_in_minimal_round_trips()
{
    let fx = Fixture::new(2, "kv2-full", ", field = \"password\"", "");
    let (trips, values) = two_rotations(&fx);
    let (data, metadata) = (
        format!("/v1/secret/data/{}", fx.path),
        format!("/v1/secret/metadata/{}", fx.path),
    );
    let expected = [
        // login: the token's TTL, once per login of the daemon, not per rotation
        "GET /v1/auth/token/lookup-self".to_owned(),
        format!("GET {data}"),          // engine: last_rotation (state check)
        format!("GET {data}"),          // issue: current
        format!("GET {data}"),          // stage: the object and version B
        format!("POST {data}.pending"), // stage: write with cas=0
        format!("GET {data}"),          // activate: current
        format!("GET {data}.pending"),  // verify: pending
        format!("GET {data}.pending"),  // promote: the staged object
        format!("POST {data}"),         // promote: write with cas=B
        format!("DELETE {metadata}.pending"), // promote: drop the staged copy
        format!("DELETE {metadata}.pending"), // release: in case promote could not
        format!("GET {metadata}"),      // release: versions beyond keep_versions
    ];
    assert_eq!(trips, expected, "round trips of one KV v2 rotation");
    // keep_versions = 2 (the default): version 1 (P0) is destroyed by the second release.
    assert_eq!(fx.latest().2, 3);
    assert_eq!(fx.live_versions(), vec![2, 3]);
    fx.assert_no_secret_leaked(&values, None);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv1_rotations_with_the_printed_policy_keep_previous_until_release() {
    let fx = Fixture::new(1, "kv1-full", "", "");
    let (_, values) = two_rotations(&fx);
    assert!(fx.read(".previous").is_none(), "released");
    fx.assert_no_secret_leaked(&values, None);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_keep_versions_one_destroys_the_replaced_version_at_release() {
    let fx = Fixture::new(2, "kv2-keep", ", keep_versions = 1", "");
    let out = fx.rotate();
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    assert_eq!(fx.live_versions(), vec![2]);
    let printed = fx.printed_policy();
    assert!(
        printed.contains(&format!("path \"secret/destroy/{}\"", fx.path)),
        "{printed}"
    );
}
