//! One logged-in Vault client per distinct connection, shared process-wide.
//!
//! Every store, rotator and reference built from the same (filled-in) [`VaultConnection`] gets
//! the same [`VaultSession`], so 1,000 Vault credentials log in once, not 1,000 times. The
//! session logs in lazily, on the first call, and again when Vault refuses the token as expired
//! or revoked: a 403 is checked with `lookup-self` before it is reported as a missing
//! permission, since Vault gives both the same answer.
//!
//! *Token lifetime:* the session remembers the TTL and renewability its login (or the token's
//! `lookup-self`) gave. The first call made 2/3 into the TTL renews the token (`renew-self`,
//! reading the granted `lease_duration`, which the max TTL caps); a renewal that fails, a grant
//! cut short by the max TTL, or a token already past its expiry makes that call log in again.
//! This is lazy, on the next call, so no task outlives the session and nothing polls; a token
//! with a TTL of 0 never expires and is never renewed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use keyrotd_plugin::{ProviderError, Timeouts};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::connection::VaultConnection;
use super::error::classify;
use super::login::{self, Due, Lifetime, Unwrapped};

/// A shared, lazily logged-in client for one Vault connection.
pub struct VaultSession {
    connection: VaultConnection,
    state: tokio::sync::Mutex<State>,
}

/// What the session holds between calls.
#[derive(Default)]
struct State {
    /// The current login; `None` before the first call and after Vault refused the token.
    login: Option<Login>,
    /// The secret-id unwrapped from a response-wrapping token, for later logins.
    unwrapped: Option<Unwrapped>,
}

struct Login {
    client: Arc<VaultClient>,
    lifetime: Lifetime,
}

/// Sessions by connection. Weak, so a session lives only as long as something uses it.
static SESSIONS: Mutex<Option<HashMap<VaultConnection, Weak<VaultSession>>>> = Mutex::new(None);

impl VaultSession {
    /// The session for `connection` (validated, defaults filled in), shared with every other
    /// user of an equal connection.
    pub fn shared(connection: &VaultConnection) -> Result<Arc<VaultSession>, String> {
        connection.validate()?;
        let mut sessions = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = sessions.get_or_insert_with(HashMap::new);
        if let Some(session) = sessions.get(connection).and_then(Weak::upgrade) {
            return Ok(session);
        }
        sessions.retain(|_, weak| weak.strong_count() > 0);
        let session = Arc::new(VaultSession {
            connection: connection.clone(),
            state: tokio::sync::Mutex::new(State::default()),
        });
        sessions.insert(connection.clone(), Arc::downgrade(&session));
        Ok(session)
    }

    /// The connection this session was made for.
    pub fn connection(&self) -> &VaultConnection {
        &self.connection
    }

    /// Runs one API call, `what` naming it for errors (`write secret/data/app`). A 403 whose
    /// token turns out to be expired or revoked logs in again and runs the call once more;
    /// a 403 with a valid token is a missing permission, permanent.
    pub async fn call<T, F, Fut>(
        &self,
        what: &str,
        timeouts: Timeouts,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = self.client(timeouts).await?;
        match call(client.clone()).await {
            Ok(value) => Ok(value),
            Err(ClientError::APIError { code: 403, .. }) => {
                if self.token_is_valid(&client).await? {
                    return Err(denied(what));
                }
                tracing::info!(
                    "Vault refused keyrotd's token as expired or revoked; logging in again"
                );
                self.forget(&client).await;
                let client = self.client(timeouts).await?;
                match call(client).await {
                    Err(ClientError::APIError { code: 403, .. }) => Err(denied(what)),
                    other => other.map_err(|e| classify(what, &e)),
                }
            }
            Err(e) => Err(classify(what, &e)),
        }
    }

    /// The logged-in client: logging in first if there is none, renewing its token or logging
    /// in again when its lifetime says so.
    async fn client(&self, timeouts: Timeouts) -> Result<Arc<VaultClient>, ProviderError> {
        let mut state = self.state.lock().await;
        if let Some(current) = &mut state.login {
            match current.lifetime.due(Instant::now()) {
                Due::Nothing => return Ok(current.client.clone()),
                Due::Renew => match vaultrs::token::renew_self(&*current.client, None).await {
                    Ok(auth) => {
                        current.lifetime = current.lifetime.renewed(
                            Instant::now(),
                            auth.lease_duration,
                            auth.renewable,
                        );
                        tracing::debug!(
                            ttl_seconds = auth.lease_duration,
                            "renewed keyrotd's Vault token"
                        );
                        return Ok(current.client.clone());
                    }
                    Err(e) => tracing::info!(
                        "renewing keyrotd's Vault token failed ({}); logging in again",
                        classify("renew-self", &e)
                    ),
                },
                Due::LogIn => tracing::info!(
                    "keyrotd's Vault token is at its max TTL or expired; logging in again"
                ),
            }
        }
        let state = &mut *state;
        state.login = None;
        let (client, lifetime) =
            login::log_in(&self.connection, &mut state.unwrapped, timeouts).await?;
        let client = Arc::new(client);
        state.login = Some(Login {
            client: client.clone(),
            lifetime,
        });
        Ok(client)
    }

    /// Drops `client` as the current login, unless another call replaced it already.
    async fn forget(&self, client: &Arc<VaultClient>) {
        let mut state = self.state.lock().await;
        if state
            .login
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.client, client))
        {
            state.login = None;
        }
    }

    /// Whether Vault still accepts the client's token: `lookup-self` answers 403 when it does not
    /// (or when the token lacks the `default` policy that allows it: the caller then logs in
    /// again and gets the same 403 a second time, which settles it).
    async fn token_is_valid(&self, client: &VaultClient) -> Result<bool, ProviderError> {
        match vaultrs::token::lookup_self(client).await {
            Ok(_) => Ok(true),
            Err(ClientError::APIError { code: 403, .. }) => Ok(false),
            Err(e) => Err(classify("look up keyrotd's own Vault token", &e)),
        }
    }

    /// A client of this connection that carries `token` instead of keyrotd's own (`""`: none),
    /// for calls made as another identity (a rotator's test login).
    pub(crate) fn client_with_token(&self, token: &str) -> Result<VaultClient, ProviderError> {
        login::build(&self.connection, token)
    }
}

/// The permanent error for a 403 that a fresh login did not cure.
fn denied(what: &str) -> ProviderError {
    ProviderError::permanent(format!(
        "{what}: permission denied: the Vault policy of keyrotd's token lacks the capability \
         this call needs"
    ))
    .with_code("403")
}
