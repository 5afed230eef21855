//! A counting, cuttable HTTP proxy in front of OpenBao: one request per connection, each
//! recorded as `METHOD /v1/path`, and requests whose line matches a cut answered by closing
//! the connection unread (OpenBao unreachable for exactly those calls).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Shared {
    seen: Vec<String>,
    cut: Option<String>,
    dropped: usize,
}

/// The running proxy; it lives until the test process ends.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Mutex<Shared>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (state, upstream) = (state.clone(), upstream.clone());
                std::thread::spawn(move || serve(client, &upstream, &state));
            }
        });
        Self { url, shared }
    }

    /// The requests forwarded so far (`GET /v1/secret/data/app`), without query strings.
    pub fn seen(&self) -> Vec<String> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// Forgets the requests seen so far.
    pub fn reset(&self) {
        self.shared.lock().unwrap().seen.clear();
    }

    /// Drops every request whose line (`POST /v1/secret/data/app`) equals `line`, or every
    /// request with `*`; `None` lets everything through again.
    pub fn cut(&self, line: Option<&str>) {
        self.shared.lock().unwrap().cut = line.map(str::to_owned);
    }

    /// How many requests the cut dropped.
    pub fn dropped(&self) -> usize {
        self.shared.lock().unwrap().dropped
    }
}

fn serve(mut client: TcpStream, upstream: &str, state: &Mutex<Shared>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let line = format!("{method} {}", target.split('?').next().unwrap_or(""));
    {
        let mut state = state.lock().unwrap();
        if state.cut.as_deref().is_some_and(|c| c == "*" || c == line) {
            state.dropped += 1;
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        state.seen.push(line);
    }
    // Forward with `Connection: close`, so the answer ends with the upstream connection.
    let mut request: String = head
        .lines()
        .filter(|l| {
            !l.to_ascii_lowercase().starts_with("connection:")
                && !l.to_ascii_lowercase().starts_with("keep-alive:")
                && !l.is_empty()
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    request.push_str("Connection: close\r\n\r\n");
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    if server.write_all(request.as_bytes()).is_err()
        || server.write_all(&buf[head_end..head_end + length]).is_err()
    {
        return;
    }
    let mut answer = Vec::new();
    let _ = server.read_to_end(&mut answer);
    let _ = client.write_all(&answer);
    let _ = client.shutdown(Shutdown::Both);
}
