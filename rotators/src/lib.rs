//! keyrotd's providers: the rotators and stores that implement the plugin API
//! ([`keyrotd_plugin`]), one module per provider.
//!
//! Crate map:
//! - [`random`]: the `random` rotator (a generated password or token);
//! - [`file`](mod@file): the `file` store (a local file, atomically replaced);
//! - [`aws`] (feature `aws`): the `aws_secrets_manager` store and the `aws_iam_access_key`
//!   rotator;
//! - [`postgres`] (feature `postgres`): the `postgres_password` rotator (a role's password,
//!   single or alternating roles);
//! - [`http`] (feature `http`): the `http` rotator (an API key issued and revoked through
//!   configured HTTP requests);
//! - [`vault`] (feature `vault`): HashiCorp Vault and OpenBao: the `[vault]` connection, login
//!   and the client every Vault store, rotator and `vault:` reference shares;
//! - [`config`]: the `kind`-tagged configuration of every rotator and store, and their
//!   construction: the one place that lists the providers;
//! - [`resolve`]: reading secret references, each remote scheme through its provider;
//! - [`timeouts`]: the `connect_timeout` and `timeout` fields of plugins that talk to a server
//!   (only with one of them compiled in).
//!
//! Adding a provider means one module, one cargo feature and one variant in [`config`].
//! *Invariant:* plugins decide nothing about time or retries beyond one step, and no error message
//! or `Debug` output carries secret material.

#![warn(missing_docs)]

#[cfg(feature = "aws")]
pub mod aws;
pub mod config;
pub mod file;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod random;
pub mod resolve;
#[cfg(any(
    feature = "aws",
    feature = "postgres",
    feature = "http",
    feature = "vault"
))]
pub mod timeouts;
#[cfg(feature = "vault")]
pub mod vault;

pub use config::{AwsDefaults, ProviderDefaults, RotatorConfig, StoreConfig, VaultDefaults};
