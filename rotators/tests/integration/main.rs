//! The plugins' integration tests, as one test binary (Cargo builds `tests/NAME/main.rs` as the
//! test target NAME): one link of the AWS SDK instead of one per file. Each module is one former
//! `rotators/tests/*.rs` file (a long one is a folder of submodules by topic) and keeps its test
//! names under its module path.
//!
//! Tests that need the test servers (moto, PostgreSQL, OpenBao) are
//! `#[ignore = "needs the test backends: run tests/run.sh"]`: a plain `cargo test` reports them as
//! ignored, and `tests/run.sh` starts the servers and runs them with `--include-ignored`.
//!
//! Invariant: the modules share one process, and the AWS SDK reads its credential chain and
//! `AWS_ENDPOINT_URL` from the process environment; only [`aws_env`] sets those.

mod aws;
mod aws_env;
mod deadlines;
mod http;
mod postgres;
mod postgres_pool;
mod vault_auth;
mod vault_creds;
mod vault_kv;
mod vault_session;
mod vault_tls;
