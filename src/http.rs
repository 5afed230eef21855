//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (the inventory is loaded and scheduled).
//!
//! `/metrics` is gzip-encoded when the request's `Accept-Encoding` allows gzip (Prometheus asks
//! for it): the exposition is repetitive text, a tenth of its size or less compressed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tower_http::compression::{CompressionLayer, CompressionLevel};

use crate::config::MetricsMode;
use crate::metrics::{credential_chunks, Metrics};
use crate::scheduler::Table;

/// What the handlers read.
#[derive(Clone)]
pub struct Endpoint {
    /// What `/metrics` renders.
    pub metrics: Metrics,
    /// The inventory being scheduled; replaced on each reload.
    pub table: Arc<RwLock<Option<Arc<Table>>>>,
    /// Whether `/readyz` answers ready: the inventory is loaded and scheduled.
    pub ready: Arc<AtomicBool>,
    /// The inventory's `daemon.metrics` is `"compact"`; replaced on each reload.
    pub compact: Arc<AtomicBool>,
}

/// Binds `addr` now (so a taken port fails start-up) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let app = Router::new()
        // The fastest level: a 100k-credential exposition (81 MiB) still shrinks 23-fold, and
        // zlib's default level would save only 7% more for 1.5 times the CPU (README "Metrics").
        .route(
            "/metrics",
            get(metrics).layer(CompressionLayer::new().quality(CompressionLevel::Fastest)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint);
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    }))
}

async fn ready(State(e): State<Endpoint>) -> (StatusCode, &'static str) {
    if e.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(e): State<Endpoint>) -> Response {
    let head = e.metrics.render_registry();
    let table = e.table.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mode = if e.compact.load(Ordering::Acquire) {
        MetricsMode::Compact
    } else {
        MetricsMode::Full
    };
    let body = match table {
        Some(table) => {
            let chunks = std::iter::once(head)
                .chain(credential_chunks(table, mode))
                .map(Ok::<_, std::convert::Infallible>);
            Body::from_stream(futures_util::stream::iter(chunks))
        }
        None => Body::from(head),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
