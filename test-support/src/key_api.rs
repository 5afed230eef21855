//! A small, real key-management API for the `http` rotator's tests (the plugin driven through
//! its traits, and the daemon end to end), served with axum on 127.0.0.1 in a thread with its
//! own runtime, so both sync and async tests can start it. It issues keys (`POST /v1/keys`),
//! answers a whoami with a key (`GET /v1/whoami`), revokes keys (`DELETE /v1/keys/{id}`) and
//! then rejects them, and tells when a key was last used (`GET /v1/keys/{id}`). Faults (429 with Retry-After, 5xx, malformed answers, a verify that
//! rejects every key) are queued per server.
//!
//! Invariants: admin calls need [`ADMIN_TOKEN`]; every secret it hands out is random, so a leak
//! scan finds a leaked key and nothing else; the server stops when its [`KeyApi`] is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};

/// The bearer token the API wants on issue and revoke.
pub const ADMIN_TOKEN: &str = "admin-token-5f1c0ffee0123456789";

/// A canned answer to the next issue request instead of the real one.
#[derive(Clone)]
pub enum Fault {
    /// This status, with a `Retry-After` of so many seconds if given.
    Status(u16, Option<u64>),
    /// A key is created, but the answer is this text (`ID` replaced by its id).
    Body(&'static str),
}

/// The API's state: its keys and what it was asked.
#[derive(Default)]
pub struct Api {
    next: u32,
    /// key id -> (secret, revoked)
    pub keys: BTreeMap<String, (String, bool)>,
    /// The JSON body of every successful issue request, in order (null if not JSON).
    pub bodies: Vec<Value>,
    /// Faults to answer the next issue requests with, in order.
    pub issue_faults: VecDeque<Fault>,
    /// How many issue requests arrived, faulted or not.
    pub issue_calls: u32,
    /// Whoami rejects every key (the provider has not propagated it, say).
    pub reject_verify: bool,
    /// key id -> when a whoami last used it (Unix seconds), as `GET /v1/keys/{id}` reports.
    pub last_used: BTreeMap<String, f64>,
    /// `GET /v1/keys/{id}` answers 500.
    pub fail_key_info: bool,
}

type Shared = Arc<Mutex<Api>>;

/// A running key API; stopped when dropped.
pub struct KeyApi {
    state: Shared,
    port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl KeyApi {
    /// Starts the API on a free port of 127.0.0.1, in a thread of its own.
    pub fn start() -> Self {
        let state: Shared = Arc::default();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/v1/keys", post(issue))
            .route("/v1/keys/{id}", delete(revoke).get(key_info))
            .route("/v1/whoami", get(whoami))
            .with_state(state.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                tokio::select! {
                    served = axum::serve(listener, app) => served.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        let port = port_rx.recv().expect("the key API started");
        Self {
            state,
            port,
            _stop: stop,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its state, to inspect or to queue faults.
    pub fn lock(&self) -> MutexGuard<'_, Api> {
        self.state.lock().unwrap()
    }

    /// Whether key `id` was issued and has been revoked (panics for a key never issued).
    pub fn revoked(&self, id: &str) -> bool {
        self.lock().keys[id].1
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

fn answer(status: u16, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "{:016x}{:016x}",
        RandomState::new().hash_one(Instant::now()),
        RandomState::new().hash_one(std::process::id())
    )
}

async fn issue(State(api): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut api = api.lock().unwrap();
    api.issue_calls += 1;
    if bearer(&headers).as_deref() != Some(ADMIN_TOKEN) {
        return answer(401, json!({"error": "bad admin token"}));
    }
    if let Some(fault) = api.issue_faults.pop_front() {
        return match fault {
            Fault::Status(status, retry_after) => {
                let mut r = Response::builder().status(status);
                if let Some(s) = retry_after {
                    r = r.header("retry-after", s.to_string());
                }
                r.body(Body::from("slow down")).unwrap()
            }
            Fault::Body(text) => {
                api.next += 1;
                let id = format!("k{}", api.next);
                api.keys
                    .insert(id.clone(), (format!("lost-{}", random_hex()), false));
                Response::builder()
                    .status(201)
                    .body(Body::from(text.replace("ID", &id)))
                    .unwrap()
            }
        };
    }
    api.next += 1;
    let id = format!("k{}", api.next);
    let secret = format!("sk-{id}-{}", random_hex());
    api.keys.insert(id.clone(), (secret.clone(), false));
    api.bodies
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    answer(201, json!({"key": {"id": id, "secret": secret}}))
}

async fn whoami(State(api): State<Shared>, headers: HeaderMap) -> Response {
    let mut api = api.lock().unwrap();
    let token = bearer(&headers).unwrap_or_default();
    if api.reject_verify {
        return answer(401, json!({"ok": false}));
    }
    match api
        .keys
        .iter()
        .find(|(_, (secret, revoked))| *secret == token && !revoked)
    {
        Some((id, _)) => {
            let (id, now) = (id.clone(), unix_now());
            api.last_used.insert(id.clone(), now);
            answer(200, json!({"ok": true, "id": id}))
        }
        None => answer(401, json!({"ok": false})),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A key's id and last use (Unix seconds, `null` when never used); admin only.
async fn key_info(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let api = api.lock().unwrap();
    if bearer(&headers).as_deref() != Some(ADMIN_TOKEN) {
        return answer(401, json!({"error": "bad admin token"}));
    }
    if api.fail_key_info {
        return answer(500, json!({"error": "down"}));
    }
    match api.keys.get(&id) {
        Some(_) => answer(200, json!({"id": id, "last_used": api.last_used.get(&id)})),
        None => answer(404, json!({"error": "no such key"})),
    }
}

async fn revoke(State(api): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let mut api = api.lock().unwrap();
    if bearer(&headers).as_deref() != Some(ADMIN_TOKEN) {
        return answer(401, json!({"error": "bad admin token"}));
    }
    match api.keys.get_mut(&id) {
        Some((_, revoked)) if !*revoked => {
            *revoked = true;
            Response::builder().status(204).body(Body::empty()).unwrap()
        }
        _ => answer(404, json!({"error": "no such key"})),
    }
}
