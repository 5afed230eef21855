//! Tests of the `file` store through its [`Store`] implementation: the protocol steps, crash
//! recovery, and every way a hostile neighbour could plant a name in the store's directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use std::path::Path;

use nix::unistd::User;
use secrecy::{ExposeSecret, SecretString};

use super::*;
use keyrotd_plugin::Attrs;

fn store(dir: &Path, format: Encoding) -> FileStore {
    FileStore::new(FileConfig {
        path: dir.join("db.pass"),
        mode: "0600".into(),
        owner: None,
        group: None,
        format,
    })
    .unwrap()
}

fn ctx(rotation_id: &str) -> StepContext<'_> {
    StepContext {
        credential_id: "db",
        rotation_id,
        secret_field: "password",
        started_at: std::time::SystemTime::now(),
        old_attrs: None,
    }
}

fn cred(secret: &str) -> Credential {
    Credential {
        secret: SecretString::from(secret.to_owned()),
        attrs: Attrs::from([("user".into(), "app".into())]),
    }
}

#[tokio::test]
async fn stage_promote_release_keeps_a_readable_current_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), Encoding::Raw);
    s.stage(ctx("r1"), &cred("one")).await.unwrap();
    assert!(s.current(ctx("r1")).await.unwrap().is_none());
    s.promote(ctx("r1")).await.unwrap();
    s.promote(ctx("r1")).await.unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("db.pass")).unwrap(),
        "one"
    );
    let mode = fs::metadata(dir.path().join("db.pass"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    s.stage(ctx("r2"), &cred("two")).await.unwrap();
    s.stage(ctx("r2"), &cred("ignored: already staged"))
        .await
        .unwrap();
    assert_eq!(
        s.pending(ctx("r2"))
            .await
            .unwrap()
            .unwrap()
            .secret
            .expose_secret(),
        "two"
    );
    s.promote(ctx("r2")).await.unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("db.pass")).unwrap(),
        "two"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("db.pass.previous")).unwrap(),
        "one"
    );
    s.release_previous(ctx("r1")).await.unwrap();
    assert!(
        dir.path().join("db.pass.previous").exists(),
        "an older rotation must not drop a newer previous"
    );
    s.release_previous(ctx("r2")).await.unwrap();
    assert!(!dir.path().join("db.pass.previous").exists());
}

#[tokio::test]
async fn promote_finishes_after_a_crash_between_rename_and_bookkeeping() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), Encoding::Raw);
    s.stage(ctx("r1"), &cred("one")).await.unwrap();
    // Simulate the crash: bookkeeping says "promoting", the rename happened.
    let d = s.existing_dir().unwrap();
    s.write_meta(
        &d,
        &Meta {
            current: None,
            previous: None,
            promoting: Some("r1".into()),
        },
    )
    .unwrap();
    d.rename(&s.pending_name("r1"), &s.name).unwrap();
    s.promote(ctx("r1")).await.unwrap();
    assert_eq!(s.read_meta(&d).unwrap().current.as_deref(), Some("r1"));
    assert!(
        s.promote(ctx("other")).await.is_err(),
        "promoting an unstaged rotation fails"
    );
}

#[tokio::test]
async fn json_format_round_trips_attributes_and_discard_keeps_current() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), Encoding::Json);
    s.stage(ctx("r1"), &cred("one")).await.unwrap();
    s.promote(ctx("r1")).await.unwrap();
    s.stage(ctx("r2"), &cred("two")).await.unwrap();
    s.discard(ctx("r2")).await.unwrap();
    assert!(s.pending(ctx("r2")).await.unwrap().is_none());
    let current = s.current(ctx("r3")).await.unwrap().unwrap();
    assert_eq!(current.secret.expose_secret(), "one");
    assert_eq!(current.attrs["user"], "app");
}

/// Every file in `dir` whose content contains `needle`, symlinks not followed.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .filter(|e| String::from_utf8_lossy(&fs::read(e.path()).unwrap()).contains(needle))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A directory anyone may write to, as `/tmp` is: world-writable, sticky, owned by root (the
/// tests run as root) and so accepted by the directory rule.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

#[tokio::test]
async fn a_symlink_at_any_name_is_refused_and_nothing_goes_through_it() {
    // The names keyrotd uses, and the fixed temporary names it used to write through.
    let planted = [
        ("db.pass", true),
        ("db.pass.previous", true),
        ("db.pass.keyrotd", true),
        ("db.pass.pending.r2", true),
        ("db.pass.tmp", false),
        ("db.pass.previous.tmp", false),
        ("db.pass.keyrotd.tmp", false),
        ("db.pass.pending.r2.tmp", false),
    ];
    for (name, used) in planted {
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        fs::write(&victim, "victim-data").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let dir = shared_dir();
        let s = store(dir.path(), Encoding::Raw);
        s.stage(ctx("r1"), &cred("one")).await.unwrap();
        s.promote(ctx("r1")).await.unwrap();
        let _ = fs::remove_file(dir.path().join(name));
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();

        let mut errors = Vec::new();
        for result in [
            s.current(ctx("r2")).await.map(drop),
            s.stage(ctx("r2"), &cred("two")).await,
            s.pending(ctx("r2")).await.map(drop),
            s.promote(ctx("r2")).await,
            s.release_previous(ctx("r2")).await,
        ] {
            errors.extend(result.err().map(|e| e.message));
        }

        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            "victim-data",
            "{name}: written through"
        );
        assert!(
            files_containing(dir.path(), "victim-data").is_empty(),
            "{name}: the symlink's target was read into a store file"
        );
        assert!(
            files_containing(elsewhere.path(), "one").is_empty()
                && files_containing(elsewhere.path(), "two").is_empty(),
            "{name}: a secret went through the symlink"
        );
        let named = dir.path().join(name).display().to_string();
        if used {
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(&named) && e.contains("symbolic link")),
                "{name}: no error names the symlink: {errors:?}"
            );
        } else {
            assert!(errors.is_empty(), "{name}: {errors:?}");
            assert_eq!(
                fs::read_to_string(dir.path().join("db.pass")).unwrap(),
                "two"
            );
        }
    }
}

#[tokio::test]
async fn a_directory_others_can_write_is_refused_unless_sticky_and_trusted() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shared");
    fs::create_dir(&dir).unwrap();
    let config = |mode: &str| FileConfig {
        path: dir.join("db.pass"),
        mode: mode.into(),
        owner: None,
        group: None,
        format: Encoding::Raw,
    };
    let cases = [
        (0o777, None, false),
        (0o770, None, false),
        (0o757, None, false),
        (0o1777, Some(4242), false),
        (0o1777, None, true),
        (0o1770, None, true),
        (0o750, Some(4242), true),
        (0o700, None, true),
    ];
    for (mode, owner, accepted) in cases {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&dir, Some(owner.unwrap_or(0)), None).unwrap();
        let s = FileStore::new(config("0600")).unwrap();
        let staged = s.stage(ctx("r1"), &cred("one")).await;
        let checked = config("0600").check_location();
        let what = format!("mode {mode:o} owner {owner:?}");
        if accepted {
            staged.unwrap_or_else(|e| panic!("{what}: {e}"));
            checked.unwrap_or_else(|e| panic!("{what}: {e}"));
            s.discard(ctx("r1")).await.unwrap();
        } else {
            let e = staged.expect_err(&what).message;
            assert!(
                e.contains(&dir.display().to_string()) && e.contains("writable by group or others"),
                "{what}: {e}"
            );
            assert!(checked.is_err(), "{what}: check passed");
            assert!(names_in(&dir).is_empty(), "{what}: {:?}", names_in(&dir));
        }
    }
}

#[tokio::test]
async fn the_mode_is_exact_under_a_restrictive_umask_and_owner_and_group_apply() {
    // The shipped unit runs with UMask=0077. Other tests in this process only create
    // files for themselves, which a stricter umask does not disturb.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::new(FileConfig {
        path: dir.path().join("db.pass"),
        mode: "0640".into(),
        owner: Some("nobody".into()),
        group: Some("4242".into()),
        format: Encoding::Raw,
    })
    .unwrap();
    for id in ["r1", "r2"] {
        s.stage(ctx(id), &cred(id)).await.unwrap();
        s.promote(ctx(id)).await.unwrap();
    }
    nix::sys::stat::umask(old);
    let nobody = User::from_name("nobody").unwrap().unwrap().uid.as_raw();
    for name in ["db.pass", "db.pass.previous"] {
        let meta = fs::metadata(dir.path().join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{name}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (nobody, 4242), "{name}");
    }
    let sidecar = fs::metadata(dir.path().join("db.pass.keyrotd")).unwrap();
    assert_eq!(sidecar.permissions().mode() & 0o7777, 0o600);

    let refused = |mode: &str, owner: Option<&str>, group: Option<&str>| {
        FileConfig {
            path: "/run/app/db.pass".into(),
            mode: mode.into(),
            owner: owner.map(Into::into),
            group: group.map(Into::into),
            format: Encoding::Raw,
        }
        .validate()
        .and_then(|_| {
            FileStore::new(FileConfig {
                path: "/run/app/db.pass".into(),
                mode: mode.into(),
                owner: owner.map(Into::into),
                group: group.map(Into::into),
                format: Encoding::Raw,
            })
            .map(drop)
        })
        .err()
    };
    for mode in ["0644", "0604", "0602", "0666", "0601"] {
        let e = refused(mode, None, None).unwrap_or_else(|| panic!("{mode} accepted"));
        assert!(e.starts_with("mode:"), "{e}");
    }
    assert!(refused("0660", Some("0"), Some("root")).is_none());
    let e = refused("0640", Some("no-such-user-here"), None).unwrap();
    assert!(e.starts_with("owner: no user `no-such-user-here`"), "{e}");
    let e = refused("0640", None, Some("no-such-group-here")).unwrap();
    assert!(e.starts_with("group: no group `no-such-group-here`"), "{e}");
}

/// Puts something that is not a store file at a path.
type MakeFile = fn(&Path);

#[tokio::test]
async fn special_and_oversized_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.pass");
    let s = store(dir.path(), Encoding::Raw);
    let deadline = std::time::Duration::from_secs(10);
    let kinds: [(&str, MakeFile); 4] = [
        ("FIFO", |p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("socket", |p| {
            drop(std::os::unix::net::UnixListener::bind(p).unwrap())
        }),
        ("directory", |p| fs::create_dir(p).unwrap()),
        ("larger than", |p| {
            fs::write(p, vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap()
        }),
    ];
    for (kind, make) in kinds {
        for name in ["db.pass", "db.pass.keyrotd"] {
            let at = dir.path().join(name);
            make(&at);
            s.stage(ctx("r1"), &cred("one")).await.unwrap();
            let current = tokio::time::timeout(deadline, s.current(ctx("r1")))
                .await
                .unwrap_or_else(|_| panic!("{kind} at {name}: reading blocked"));
            let promoted = tokio::time::timeout(deadline, s.promote(ctx("r1")))
                .await
                .unwrap_or_else(|_| panic!("{kind} at {name}: promote blocked"));
            let e = if name == "db.pass" {
                current.expect_err(kind).message
            } else {
                promoted.expect_err(kind).message
            };
            assert!(
                e.contains(&at.display().to_string()) && e.contains(kind),
                "{kind} at {name}: {e}"
            );
            let config = FileConfig {
                path: path.clone(),
                mode: "0600".into(),
                owner: None,
                group: None,
                format: Encoding::Raw,
            };
            if kind != "larger than" {
                let e = config.check_location().expect_err(kind);
                assert!(e.contains(kind), "{e}");
            }
            s.discard(ctx("r1")).await.unwrap();
            if at.is_dir() {
                fs::remove_dir(&at).unwrap();
            } else {
                fs::remove_file(&at).unwrap();
            }
        }
    }

    // A device is never opened: /dev/full would otherwise be read until memory runs out.
    let dev = FileStore::new(FileConfig {
        path: "/dev/full".into(),
        mode: "0600".into(),
        owner: None,
        group: None,
        format: Encoding::Raw,
    })
    .unwrap();
    let e = tokio::time::timeout(deadline, dev.current(ctx("r1")))
        .await
        .expect("reading /dev/full stopped")
        .expect_err("a device is refused")
        .message;
    assert_eq!(
        e,
        "/dev/full is a character device, not a regular file: refused"
    );
}

/// Mounts a 16 KiB tmpfs (the tests run as root) and unmounts it when dropped.
struct TinyFs(tempfile::TempDir);

impl TinyFs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs needs root: {status}");
        Self(dir)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_failed_write_leaves_no_temporary_file() {
    let fs_ = TinyFs::mount();
    let dir = fs_.0.path();
    let s = store(dir, Encoding::Json);
    s.stage(ctx("r1"), &cred("one")).await.unwrap();
    s.promote(ctx("r1")).await.unwrap();
    let before = names_in(dir);

    // Fill the file system to the last byte.
    let mut filler = fs::File::create(dir.join("filler")).unwrap();
    loop {
        use std::io::Write;
        if filler.write_all(&[0; 512]).is_err() {
            break;
        }
    }
    let mut full = before.clone();
    full.push("filler".into());
    full.sort();

    let e = s.stage(ctx("r2"), &cred("two")).await.expect_err("ENOSPC");
    assert!(e.message.contains("db.pass.pending.r2"), "{}", e.message);
    assert_eq!(names_in(dir), full, "a failed stage leaves files behind");

    drop(filler);
    fs::remove_file(dir.join("filler")).unwrap();
    s.stage(ctx("r2"), &cred("two")).await.unwrap();
    // Now fill it again so the copy to `previous` fails during promote.
    let mut filler = fs::File::create(dir.join("filler")).unwrap();
    loop {
        use std::io::Write;
        if filler.write_all(&[0; 512]).is_err() {
            break;
        }
    }
    assert!(s.promote(ctx("r2")).await.is_err());
    let leftovers: Vec<String> = names_in(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        fs::read_to_string(dir.join("db.pass")).unwrap(),
        r#"{"password":"one","user":"app"}"#
    );
}
