//! The AWS environment of this test process. The plugins find their credentials through the
//! standard chain (the environment, here) and `aws-sm:` secret references find their endpoint
//! through `AWS_ENDPOINT_URL`, both process-wide: the `aws` tests need moto there, the
//! `deadlines` tests a silent server.
//!
//! Invariants: the credential chain is set once per process, to the moto admin key when
//! tests/run.sh exported one (else a dummy key: a silent server never checks it), before any
//! test reads it. `AWS_ENDPOINT_URL` is set only while an [`Endpoint`] guard lives, by one test
//! at a time; every other test names its endpoint in the plugin's config.

use std::sync::Once;

use tokio::sync::{Mutex, MutexGuard};

/// Points the standard AWS credential chain at one key for the whole process: the admin key
/// `tests/backends/20-moto.sh` made, or a dummy key when moto is not running. Idempotent.
pub fn standard_chain() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let id = std::env::var("KEYROTD_TEST_AWS_ACCESS_KEY_ID");
        let secret = std::env::var("KEYROTD_TEST_AWS_SECRET_ACCESS_KEY");
        let (id, secret) = match (id, secret) {
            (Ok(id), Ok(secret)) => (id, secret),
            _ => ("AKIAEXAMPLEDEADLINE".into(), "not-a-real-key".into()),
        };
        std::env::set_var("AWS_ACCESS_KEY_ID", id);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::remove_var("AWS_PROFILE");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

/// `AWS_ENDPOINT_URL` set for `aws-sm:` references; removed again when dropped.
pub struct Endpoint {
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// Sets the standard chain and points `aws-sm:` references at `url` until the guard drops,
/// waiting for any other test's guard first.
pub async fn endpoint(url: &str) -> Endpoint {
    static HELD: Mutex<()> = Mutex::const_new(());
    standard_chain();
    let guard = HELD.lock().await;
    std::env::set_var("AWS_ENDPOINT_URL", url);
    Endpoint {
        _one_at_a_time: guard,
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        std::env::remove_var("AWS_ENDPOINT_URL");
    }
}
