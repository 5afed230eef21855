//! One logged-in Vault client per distinct connection, shared process-wide.
//!
//! Every store, rotator and reference built from the same (filled-in) [`VaultConnection`] gets
//! the same [`VaultSession`], so 1,000 Vault credentials log in once, not 1,000 times. The
//! session logs in lazily, on the first call, and again when Vault refuses the token as expired
//! or revoked: a 403 is checked with `lookup-self` before it is reported as a missing
//! permission, since Vault gives both the same answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use keyrotd_plugin::{ProviderError, Timeouts};
use secrecy::ExposeSecret;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::connection::{VaultAuth, VaultConnection};
use super::error::classify;
use crate::resolve::Resolve;

/// A shared, lazily logged-in client for one Vault connection.
pub struct VaultSession {
    connection: VaultConnection,
    /// The current login; `None` before the first call and after Vault refused the token.
    login: tokio::sync::Mutex<Option<Arc<VaultClient>>>,
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
            login: tokio::sync::Mutex::new(None),
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

    /// The logged-in client, logging in first if there is none.
    async fn client(&self, timeouts: Timeouts) -> Result<Arc<VaultClient>, ProviderError> {
        let mut login = self.login.lock().await;
        if let Some(client) = &*login {
            return Ok(client.clone());
        }
        let client = Arc::new(self.log_in(timeouts).await?);
        *login = Some(client.clone());
        Ok(client)
    }

    /// Drops `client` as the current login, unless another call replaced it already.
    async fn forget(&self, client: &Arc<VaultClient>) {
        let mut login = self.login.lock().await;
        if login.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *login = None;
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

    async fn log_in(&self, timeouts: Timeouts) -> Result<VaultClient, ProviderError> {
        let Some(auth) = &self.connection.auth else {
            return Err(ProviderError::permanent("vault.auth: missing"));
        };
        let token = match auth {
            VaultAuth::Token { token } => token.resolve_async(timeouts).await.map_err(|e| {
                let class = e.class();
                ProviderError {
                    class,
                    code: None,
                    message: format!("Vault login: {e}"),
                }
            })?,
        };
        self.build(token.expose_secret())
    }

    /// A client of this connection that carries `token` instead of keyrotd's own (`""`: none),
    /// for calls made as another identity (a rotator's test login).
    pub(crate) fn client_with_token(&self, token: &str) -> Result<VaultClient, ProviderError> {
        self.build(token)
    }

    /// A client for the connection carrying `token`, every setting explicit so that no
    /// `VAULT_*` variable of keyrotd's environment changes it.
    fn build(&self, token: &str) -> Result<VaultClient, ProviderError> {
        let c = &self.connection;
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            // validate() parsed it: the builder's setter panics on an invalid URL.
            .address(c.address.as_deref().unwrap_or_default())
            .token(token)
            .verify(true)
            .identity(None)
            .namespace(c.namespace.clone())
            .timeout(Some(c.request_timeout()))
            .ca_certs(c.ca_cert.iter().map(|p| p.display().to_string()).collect());
        let settings = settings
            .build()
            .map_err(|e| ProviderError::permanent(format!("Vault client settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| classify("Vault client", &e))
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
