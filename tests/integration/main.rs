//! The daemon's integration tests, as one test binary (Cargo builds `tests/NAME/main.rs` as the
//! test target NAME): one link of the AWS SDK and the daemon instead of one per file. Each module
//! is one former `tests/*.rs` file (a long one is a folder of submodules by topic) and keeps its
//! test names under its module path (`cargo test --test integration daemon::`).
//!
//! Tests that need the test servers (moto, PostgreSQL, the SMTP sink, Prometheus) are
//! `#[ignore = "needs the test backends: run tests/run.sh"]`: a plain `cargo test` reports them as
//! ignored, and `tests/run.sh` starts the servers and runs them with `--include-ignored`.
//!
//! Invariant: the modules share one process, so none of them changes process-wide state (the
//! environment, the working directory, signal dispositions); they set what a spawned `keyrotd`
//! needs on its `Command` instead.

mod alert_rules;
mod alerts;
mod alerts_e2e;
mod audit;
mod aws_e2e;
mod closed_pipe;
mod daemon;
mod deadlines;
mod engine;
mod generated_docs;
mod hooks;
mod http_e2e;
mod in_use;
mod loading;
mod logging;
mod packaging;
mod policy;
mod postgres_e2e;
mod prometheus_rules_live;
mod proxy;
mod scrapes;
mod state_loss;
mod status;
mod store_locations;
mod support;
mod systemd_notify;
mod vault_creds;
mod vault_e2e;
mod vault_kv;
