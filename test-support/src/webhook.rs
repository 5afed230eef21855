//! A webhook receiver for tests: a real HTTP server on a loopback port that records every POST
//! and can answer with chosen status codes, or not at all.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Its body, which must be JSON.
    pub body: Value,
}

/// What a receiver has got and how it answers; shared with its handler.
#[derive(Default)]
pub struct ReceiverState {
    /// Every request so far, in order.
    pub received: Mutex<Vec<Received>>,
    /// Status codes to answer first, in order; 200 afterwards.
    pub statuses: Mutex<VecDeque<u16>>,
    /// Never answer (to test the shutdown flush deadline).
    pub hang: bool,
}

/// A real HTTP server on an ephemeral loopback port that records every POST.
pub struct Receiver {
    /// `http://127.0.0.1:PORT/hook`, where it takes POSTs.
    pub url: String,
    state: Arc<ReceiverState>,
}

impl Receiver {
    /// Starts a receiver on the current runtime that answers with `statuses` first, then 200.
    pub async fn start(statuses: &[u16]) -> Self {
        Self::start_with(ReceiverState {
            statuses: Mutex::new(statuses.iter().copied().collect()),
            ..Default::default()
        })
        .await
    }

    /// Starts a receiver on the current runtime with a prepared `state`.
    pub async fn start_with(state: ReceiverState) -> Self {
        async fn hook(
            State(state): State<Arc<ReceiverState>>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let body = serde_json::from_slice(&body).expect("receiver got a JSON body");
            let authorization = headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            state.received.lock().unwrap().push(Received {
                authorization,
                body,
            });
            if state.hang {
                std::future::pending::<()>().await;
            }
            let status = state.statuses.lock().unwrap().pop_front().unwrap_or(200);
            StatusCode::from_u16(status).unwrap()
        }
        let state = Arc::new(state);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    /// Every request it has got so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}
