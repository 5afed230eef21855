//! An HTTP proxy named in keyrotd's environment never sees a request to loopback: plain
//! `http://` is allowed only there, on the grounds that no network sits in between, and a proxy
//! would carry the Vault token (or a hook's or rotator's secret headers) in clear text over one.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::keyrotd;

#[test]
fn a_proxy_in_the_environment_never_carries_a_loopback_request() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    // Where Vault would be: nothing listens there.
    let vault_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("keyrotd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate = \"sqlite:{state}/keyrotd.db\"\n\n\
             [vault]\naddress = \"http://127.0.0.1:{vault_port}\"\n\
             auth = {{ method = \"token\", token = \"env:PROXY_TEST_TOKEN\" }}\n\n\
             [[credential]]\nid = \"a\"\nrotator = {{ kind = \"random\" }}\n\
             store = {{ kind = \"vault_kv2\", mount = \"secret\", path = \"app\", field = \"password\", timeout = \"3s\" }}\n\
             rotate_every = \"1d\"\nmax_age = \"2d\"\n",
            state = dir.path().display()
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, stopped) = (Arc::new(AtomicBool::new(false)), stop.clone());
    let saw = seen.clone();
    let listener = std::thread::spawn(move || {
        while !stopped.load(Ordering::SeqCst) {
            if let Ok((mut conn, _)) = proxy.accept() {
                let mut buf = [0u8; 256];
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = conn.read(&mut buf);
                saw.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let out = keyrotd()
        .arg("--config")
        .arg(&config)
        .args(["rotate", "a"])
        .env("PROXY_TEST_TOKEN", "proxy-test-token-value")
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("ALL_PROXY", &proxy_url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("could not reach Vault"), "{stderr}");
    assert!(
        !seen.load(Ordering::SeqCst),
        "the proxy received a request meant for loopback"
    );
}
