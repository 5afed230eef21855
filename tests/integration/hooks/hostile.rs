//! Hostile hooks: pid files that are symlinks, FIFOs or hold no plain pid above 1 are refused
//! without signalling anything; configurations with traversing unit names, relative paths,
//! disallowed signals, plain-http URLs off loopback and out-of-range timeouts are refused with
//! their file, line and field.

use super::*;

#[test]
fn a_pid_file_that_is_not_a_plain_pid_in_a_regular_file_is_refused() {
    let s = Setup::new(
        "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"",
        "",
    );
    // A process that a followed symlink or a misparsed pid would signal.
    let mut victim = Command::new("sleep").arg("300").spawn().unwrap();
    let real = s.path("real.pid");
    std::fs::write(&real, victim.id().to_string()).unwrap();
    let fifo = s.path("fifo.pid");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let link = s.path("link.pid");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (link, "is a symlink: refused"),
        (fifo, "is not a regular file: refused"),
        (s.path("one.pid"), "does not hold a pid greater than 1"),
        (s.path("minus.pid"), "does not hold a pid greater than 1"),
        (s.path("huge.pid"), "does not hold a pid greater than 1"),
        (s.path("garbage.pid"), "does not hold a pid greater than 1"),
        (s.path("missing.pid"), "No such file"),
        (s.path("writable.pid"), "is writable by its group or others"),
        (s.path("padded.pid"), "is longer than a pid: refused"),
        (s.path("self.pid"), "names keyrotd itself: refused"),
    ];
    // Anyone may write it: anyone could aim keyrotd's signal at any process.
    std::fs::write(s.path("writable.pid"), victim.id().to_string()).unwrap();
    std::fs::set_permissions(
        s.path("writable.pid"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    // Cut at 64 bytes, this would read as the pid of the victim.
    std::fs::write(
        s.path("padded.pid"),
        format!("{}{}7", " ".repeat(60), victim.id()),
    )
    .unwrap();
    // keyrotd's own pid: written by an exec hook that runs first (its shell's parent).
    std::fs::write(s.path("one.pid"), "1\n").unwrap();
    std::fs::write(s.path("minus.pid"), "-1\n").unwrap();
    std::fs::write(s.path("huge.pid"), format!("{}\n", u64::MAX)).unwrap();
    std::fs::write(s.path("garbage.pid"), format!("{} 7", victim.id())).unwrap();
    for (pid_file, want) in cases {
        let first = if pid_file.ends_with("self.pid") {
            format!(
                "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"echo $PPID > {}\"]\n\n",
                pid_file.display()
            )
        } else {
            String::new()
        };
        let hooks = format!(
            "{first}[[credential.hook]]\nkind = \"signal\"\npid_file = \"{}\"\nsignal = \"TERM\"\nretry = {{ max_attempts = 1 }}\n",
            pid_file.display()
        );
        std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
        let started = std::time::Instant::now();
        let out = s.cli(&["rotate", "api"]);
        assert!(!out.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a FIFO never blocks"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{}: {err}", pid_file.display());
        assert!(
            victim.try_wait().unwrap().is_none(),
            "{}: signalled",
            pid_file.display()
        );
    }
    let _ = victim.kill();
    let _ = victim.wait();
}

#[test]
fn hostile_hook_configurations_are_refused_with_file_line_and_field() {
    let s = Setup::new("rotate_every = \"30d\"\nmax_age = \"40d\"", "");
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let line = text0.lines().count() + 3;
    let cases = [
        (
            "kind = \"systemd\"\nunit = \"../../etc/x.service\"",
            "hook[0].unit",
            "is not a unit name",
        ),
        (
            "kind = \"systemd\"\nunit = \"a/b.service\"",
            "hook[0].unit",
            "is not a unit name",
        ),
        (
            "kind = \"systemd\"\nunit = \"..service\"",
            "hook[0].unit",
            "is not a unit name",
        ),
        (
            "kind = \"systemd\"\nunit = \"nginx\"",
            "hook[0].unit",
            "is not a unit name",
        ),
        (
            "kind = \"systemd\"\nunit = \"x@.service\"",
            "hook[0].unit",
            "is not a unit name",
        ),
        (
            "kind = \"systemd\"\nunit = \"x.service\"\nsystemctl = \"systemctl\"",
            "hook[0].systemctl",
            "absolute path",
        ),
        (
            "kind = \"exec\"\ncommand = [\"true\"]",
            "hook[0].command",
            "absolute path",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/../bin/true\"]",
            "hook[0].command",
            "absolute path",
        ),
        (
            "kind = \"exec\"\ncommand = []",
            "hook[0].command",
            "absolute path",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\nenv = { KEYROTD_ROTATION_ID = \"x\" }",
            "hook[0].env",
            "not a variable name",
        ),
        (
            "kind = \"signal\"\npid_file = \"run/x.pid\"\nsignal = \"HUP\"",
            "hook[0].pid_file",
            "absolute path",
        ),
        (
            "kind = \"signal\"\npid_file = \"/run/x.pid\"\nsignal = \"KILL\"",
            "hook[0].signal",
            "not an allowed signal",
        ),
        (
            "kind = \"http\"\nurl = \"http://example.com/reload\"",
            "hook[0].url",
            "must use https",
        ),
        (
            "kind = \"http\"\nurl = \"ftp://127.0.0.1/\"",
            "hook[0].url",
            "unsupported scheme",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"",
            "hook[0].timeout",
            "longer than zero",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"2h\"",
            "hook[0].timeout",
            "at most 1h",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"300000y\"",
            "hook[0].timeout",
            "too long",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\nretry = { max_backoff = \"1h\" }",
            "hook[0].retry",
            "at most",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\nunit = \"x.service\"",
            "hook[0].unit",
            "not a field of a `exec` hook",
        ),
        (
            "kind = \"exec\"\ncommand = [\"/bin/true\"]\nwhen = \"revoke\"",
            "hook[0].when",
            "not a hook time",
        ),
        ("kind = \"shell\"", "hook[0].kind", "not a hook kind"),
    ];
    for (hook, field, want) in cases {
        std::fs::write(
            s.config(),
            format!("{text0}\n[[credential.hook]]\n{hook}\n"),
        )
        .unwrap();
        let out = s.cli(&["check"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{hook}: {err}");
        let place = format!("{}:", s.config().display());
        let found = err
            .lines()
            .find(|l| l.contains(want))
            .unwrap_or_else(|| panic!("{hook}: {err}"));
        assert!(
            found.contains(&format!("credential[api].{field}:")),
            "{hook}: {found}"
        );
        let at: usize = found[place.len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (line..line + 4).contains(&at),
            "{hook}: line {at}, want near {line}: {found}"
        );
    }
    // [defaults] hooks are checked where they are written, and inherited.
    let with_default = text0.replace(
        "[[credential]]",
        "[[defaults.hook]]\nkind = \"signal\"\npid_file = \"/run/x.pid\"\nsignal = \"STOP\"\n\n[[credential]]",
    );
    std::fs::write(s.config(), with_default).unwrap();
    let out = s.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("defaults.hook[0].signal: `STOP` is not an allowed signal"),
        "{err}"
    );
}
