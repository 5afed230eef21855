//! `keyrotd check` on the real binary refuses store locations that are unsafe or shared: two
//! credentials writing the same place, a special file or symlink at a store name, a directory
//! others can write to, a mode every user can read.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::*;

/// Writes an inventory with `credentials` (TOML `[[credential]]` sections) and runs `check`.
fn check(dir: &Path, credentials: &str) -> (Option<i32>, String) {
    let config = dir.join("config.toml");
    let text = format!(
        "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{}\"\n\n\
         [defaults]\nrotate_every = \"30d\"\nmax_age = \"40d\"\n{credentials}",
        free_port()
    );
    std::fs::write(&config, text).unwrap();
    let out = keyrotd()
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env("ADMIN_DSN", "host=127.0.0.1 user=postgres")
        .output()
        .expect("spawn keyrotd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn random(id: &str, store: &str) -> String {
    format!("\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\" }}\nstore = {store}\n")
}

fn file(path: &Path) -> String {
    format!("{{ kind = \"file\", path = \"{}\" }}", path.display())
}

#[test]
fn check_refuses_two_credentials_with_one_location() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&out, dir.path().join("link")).unwrap();
    let sm = |id: &str| {
        format!(
            "{{ kind = \"aws_secrets_manager\", secret_id = \"{id}\", region = \"eu-west-1\" }}"
        )
    };
    let pg = |id: &str, roles: &str| {
        format!(
            "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"postgres_password\", admin_dsn = \"env:ADMIN_DSN\", \
             strategy = \"alternating\", roles = {roles} }}\nstore = {}\n",
            file(&out.join(id))
        )
    };
    // (inventory, the error expected on the second credential)
    let cases = [
        (
            random("a", &file(&out.join("x"))) + &random("b", &file(&out.join("x"))),
            format!("config.toml:16:11: credential[b].store: file {} is also written by credential `a` (line 11)", out.join("x").display()),
        ),
        (
            // The same file through `..` and through a symlinked directory.
            random("a", &file(&out.join("x"))) + &random("b", &file(&dir.path().join("link/../out/x"))),
            "credential[b].store: file".to_owned(),
        ),
        (
            random("a", &file(&dir.path().join("link/x"))) + &random("b", &file(&out.join("x"))),
            "credential[b].store: file".to_owned(),
        ),
        (
            // One credential's file is the other's kept previous value.
            random("a", &file(&out.join("x"))) + &random("b", &file(&out.join("x.previous"))),
            format!("credential[b].store: file {}.previous is also written by credential `a`", out.join("x").display()),
        ),
        (
            random("a", &sm("app/db")) + &random("b", &sm("app/db")),
            "credential[b].store: Secrets Manager secret `app/db` in region eu-west-1 at AWS is also written by credential `a` (line 11)".to_owned(),
        ),
        (
            pg("a", "[\"app_a\", \"app_b\"]") + &pg("b", "[\"app_b\", \"app_c\"]"),
            "credential[b].rotator: PostgreSQL role `app_b` of the server at env:ADMIN_DSN is also written by credential `a` (line 11)".to_owned(),
        ),
    ];
    for (credentials, expected) in cases {
        let (code, stderr) = check(dir.path(), &credentials);
        assert_eq!(code, Some(2), "{credentials}\n{stderr}");
        assert!(
            stderr.contains(&expected),
            "want `{expected}` in:\n{stderr}"
        );
    }
    // Different secrets, regions and roles are fine.
    let (code, stderr) = check(
        dir.path(),
        &(random("a", &sm("app/db"))
            + &random("b", "{ kind = \"aws_secrets_manager\", secret_id = \"app/db\", region = \"us-east-1\" }")
            + &pg("c", "[\"app_a\", \"app_b\"]")
            + &pg("d", "[\"app_c\", \"app_d\"]")),
    );
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn check_refuses_special_files_symlinks_open_directories_and_readable_modes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", out.join("linked")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", out.join("side.keyrotd")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(out.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::create_dir(out.join("directory")).unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();

    let cases = [
        (file(Path::new("/dev/full")), "credential[a].store: path: /dev/full is a character device, not a regular file: refused".to_owned()),
        (file(&out.join("fifo")), format!("path: {} is a FIFO, not a regular file", out.join("fifo").display())),
        (file(&out.join("directory")), format!("path: {} is a directory, not a regular file", out.join("directory").display())),
        (file(&out.join("linked")), format!("path: {} is a symbolic link: refused", out.join("linked").display())),
        (file(&out.join("side")), format!("path: {} is a symbolic link: refused", out.join("side.keyrotd").display())),
        (file(&open.join("x")), format!("path: directory {} is writable by group or others (mode 0777", open.display())),
        (format!("{{ kind = \"file\", path = \"{}\", mode = \"0644\" }}", out.join("x").display()), "credential[a].store.mode: 0644 gives every user on the host access to the secret".to_owned()),
        (format!("{{ kind = \"file\", path = \"{}\", owner = \"no-such-user-here\" }}", out.join("x").display()), "credential[a].store: owner: no user `no-such-user-here`".to_owned()),
    ];
    for (store, expected) in cases {
        let (code, stderr) = check(dir.path(), &random("a", &store));
        assert_eq!(code, Some(2), "{store}\n{stderr}");
        assert!(
            stderr.contains(&expected),
            "want `{expected}` in:\n{stderr}"
        );
    }
    let (code, stderr) = check(dir.path(), &random("a", &format!("{{ kind = \"file\", path = \"{}\", mode = \"0640\", owner = \"nobody\", group = \"0\" }}", out.join("x").display())));
    assert_eq!(code, Some(0), "{stderr}");
}
