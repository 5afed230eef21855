//! Loading a large inventory through the real binary: `keyrotd check` on 20,000 credentials
//! (a 4.2 MB file) under a data-segment limit (`RLIMIT_DATA`, which counts every heap
//! allocation, touched or not) of 24 MiB. The loader streams the file, so it needs about the
//! validated records themselves (some 14 MiB here); a loader that held the file text, a
//! blanked copy of it or one TOML tree of it (the parser's token buffer alone is seven bytes
//! per byte of input) runs out and aborts.

use std::io::{BufWriter, Write};
use std::os::unix::process::CommandExt;

use crate::support::keyrotd;

const CREDENTIALS: usize = 20_000;
const DATA_LIMIT: u64 = 24 * 1024 * 1024;

#[test]
fn check_loads_a_large_inventory_within_a_small_heap() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let path = dir.path().join("inventory.toml");
    let mut out = BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(
        out,
        "[daemon]\nstate = \"sqlite:state.db\"\n\n[defaults]\ngrace = \"1h\"\n"
    )
    .unwrap();
    for i in 0..CREDENTIALS {
        let timing = if i % 10 < 4 {
            format!("schedule = \"17 2 {} * *\"\nmax_age = \"35d\"", i % 28 + 1)
        } else {
            "rotate_every = \"30d\"\nmax_age = \"40d\"".to_owned()
        };
        writeln!(
            out,
            "\n[[credential]]\nid = \"svc-{i:06}-token\"\n\
             rotator = {{ kind = \"random\", length = 32, alphabet = \"base64url\" }}\n\
             store = {{ kind = \"file\", path = \"{}/svc-{i:06}-token\" }}\n{timing}",
            store.display()
        )
        .unwrap();
    }
    // A mistake near the end: the error must still name its real line.
    writeln!(out, "\n[defaults.oops]").unwrap();
    out.flush().unwrap();
    drop(out);
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();

    let run = |config: &std::path::Path| {
        let mut cmd = keyrotd();
        cmd.arg("--config").arg(config).arg("check");
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: DATA_LIMIT,
                    rlim_max: DATA_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd.output().unwrap()
    };
    let out = run(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("inventory.toml:{lines}:")) && stderr.contains("oops"),
        "{stderr}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\n[defaults.oops]\n", "\n")).unwrap();
    let out = run(&path);
    assert!(
        out.status.success(),
        "keyrotd check ran out of its {} MiB heap: {}",
        DATA_LIMIT >> 20,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("svc-019999-token"), "{stdout:.300}");
}

/// An inventory read from a pipe (`--config /dev/stdin`, `--config <(generate)`), which can be
/// read only once: the loader reads it whole instead of twice.
#[test]
fn check_loads_an_inventory_from_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[daemon]\nstate = \"sqlite:state.db\"\n\n[[credential]]\nid = \"piped\"\n\
         rotator = {{ kind = \"random\", length = 32 }}\n\
         store = {{ kind = \"file\", path = \"{}/piped\" }}\nrotate_every = \"30d\"\nmax_age = \"40d\"\n",
        dir.path().display()
    );
    let mut child = keyrotd()
        .args(["check", "--config", "/dev/stdin"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("1 credential(s) OK"), "{shown}");
}
