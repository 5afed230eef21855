//! A provider behind a silent network partition: a TCP server on loopback that accepts every
//! connection, holds it open, and never reads or writes a byte.
//!
//! Used by the daemon's and the plugins' deadline tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A running silent server. It lives until the test process ends.
pub struct Silent {
    /// Where it listens, on 127.0.0.1.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Silent {
    /// Binds 127.0.0.1 on a free port and accepts on a thread of its own, so the server outlives
    /// the runtime of the test that started it.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut held = Vec::new();
                loop {
                    if let Ok((socket, _)) = listener.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                        held.push(socket);
                    }
                }
            });
        });
        Self { addr, accepted }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
