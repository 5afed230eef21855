//! HashiCorp Vault and OpenBao (the same HTTP API), through the `vaultrs` client.
//!
//! - [`connection`]: the `[vault]` table and its per-credential override: address, namespace,
//!   TLS and how to log in ([`VaultAuth`]). A credential's own `vault` table wins field by field.
//! - [`session`]: one logged-in client per distinct connection, shared by every credential,
//!   store and reference that names it; [`VaultSession::call`] runs one API call and turns its
//!   failure into a [`ProviderError`](keyrotd_plugin::ProviderError) naming what was attempted.
//! - `error`: how Vault's answers are classified (transient or permanent).
//! - `login`: the auth methods (token, AppRole with an optionally wrapped secret-id, JWT), the
//!   client they build (TLS CA and client certificate) and the token's lifetime.
//! - [`reference`](mod@reference): `vault:MOUNT/PATH#field` secret references and their cache.
//! - [`kv`]: the `vault_kv2` and `vault_kv1` stores.
//! - [`approle`]: the `vault_approle_secret_id` rotator; [`pki`]: the `vault_pki_certificate`
//!   rotator; `calls`: the plain JSON requests both send through the session's client.
//!
//! *Invariants:* plain `http://` only to loopback; the token lives only in the session (and,
//! unavoidably, as a `String` inside `vaultrs`'s client, which is never `Debug`-printed); no
//! error message carries a response body, only Vault's own error strings, which name no value.
//! `vaultrs` reads `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_CACERT` and `VAULT_SKIP_VERIFY` for every
//! setting left unset: the session sets each one explicitly, so only the inventory decides.

pub mod connection;
mod error;
pub mod kv;
mod login;
pub mod reference;
pub mod session;

pub mod approle;
mod calls;
pub mod pki;

pub use connection::{VaultAuth, VaultConnection};
pub use session::VaultSession;
