//! `keyrotd policy` for the `postgres_password` rotator against the test cluster: a fresh admin
//! role given only the printed SQL rotates passwords (single and alternating); without either
//! of its attributes the rotation fails at `activate` with the server's SQLSTATE and the old
//! password keeps working.

use super::*;

/// The printed SQL statements that apply to this server, with keyrotd's admin role filled in as
/// psql's `-v admin_role=NAME` would. Checks that they grant only what the rotator needs.
fn printed_sql(s: &Setup, admin: &str, roles: &[&str]) -> Vec<String> {
    let out = keyrotd()
        .arg("--config")
        .arg(s.config())
        .args(["policy", "db", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "policy: {}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let policy = &printed[0];
    assert!(policy["aws_policy"].is_null(), "{policy}");
    let sql = policy["sql"].as_array().unwrap();
    let statements = |versions: Option<&str>| -> Vec<String> {
        sql.iter()
            .filter(|g| g["versions"].as_str() == versions)
            .map(|g| g["statement"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        statements(None),
        [r#"ALTER ROLE :"admin_role" WITH LOGIN CREATEROLE;"#],
        "{policy}"
    );
    let newer: Vec<String> = roles
        .iter()
        .map(|r| {
            format!(r#"GRANT "{r}" TO :"admin_role" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;"#)
        })
        .collect();
    assert_eq!(
        statements(Some("PostgreSQL 16 and newer")),
        newer,
        "{policy}"
    );
    let mut apply = statements(None);
    if server_version() >= 160000 {
        apply.extend(newer);
    }
    apply
        .iter()
        .map(|s| s.replace(r#":"admin_role""#, &format!("\"{admin}\"")))
        .collect()
}

fn server_version() -> u32 {
    block_on(async {
        let config: tokio_postgres::Config = admin_dsn().parse().unwrap();
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap();
        row.get::<_, i32>(0) as u32
    })
}

/// A role with no attribute at all (not even LOGIN) and a password, made by the superuser; its
/// connection string.
fn fresh_admin(name: &str) -> String {
    admin_exec(&format!(
        "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} PASSWORD 'pw-{name}'"
    ));
    admin_dsn()
        .split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("user", _)) => format!("user={name}"),
            Some(("password", _)) => format!("password=pw-{name}"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const TIMING: &str = "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"";

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_role_with_only_the_printed_privileges_rotates_single_and_alternating() {
    let s = Setup::single("pol_single", TIMING);
    let dsn = fresh_admin("pol_admin_single");
    admin_exec(&printed_sql(&s, "pol_admin_single", &["pol_single"]).join("\n"));
    for _ in 0..2 {
        let out = s.cli_with_dsn(&dsn, &["rotate", "db"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v = s.current().unwrap();
        assert_eq!(login("pol_single", &v.password), Ok(()));
    }
    assert_eq!(
        login("pol_single", "start-pol_single").unwrap_err(),
        "28P01"
    );

    let s = Setup::alternating("pol_alt_a", "pol_alt_b", TIMING);
    let dsn = fresh_admin("pol_admin_alt");
    admin_exec(&printed_sql(&s, "pol_admin_alt", &["pol_alt_a", "pol_alt_b"]).join("\n"));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let out = s.cli_with_dsn(&dsn, &["rotate", "db"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v = s.current().unwrap();
        assert_eq!(login(&v.username, &v.password), Ok(()));
        seen.push(v.username);
    }
    assert_eq!(seen, ["pol_alt_a", "pol_alt_b", "pol_alt_a"]);
    // With grace 0s each rotation revoked the idle role: its starting password is gone.
    assert_eq!(login("pol_alt_b", "start-pol_alt_b").unwrap_err(), "28P01");
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn without_createrole_or_login_the_rotation_fails_at_activate() {
    for (attribute, kept, sqlstate) in [
        ("CREATEROLE", "LOGIN", "42501"),
        ("LOGIN", "CREATEROLE", "28000"),
    ] {
        let role = format!("pol_no_{}", attribute.to_lowercase());
        let admin = format!("{role}_admin");
        let s = Setup::single(&role, TIMING);
        let dsn = fresh_admin(&admin);
        let printed = printed_sql(&s, &admin, &[&role]);
        assert_eq!(
            printed,
            [format!("ALTER ROLE \"{admin}\" WITH LOGIN CREATEROLE;")]
        );
        admin_exec(&printed[0].replace(&format!(" {attribute}"), ""));
        assert!(printed[0].contains(kept));

        let out = s.cli_with_dsn(&dsn, &["rotate", "db"]);
        assert_eq!(out.status.code(), Some(1), "{attribute}: {}", stderr(&out));
        let history = s.history();
        let failed: Vec<&str> = history
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("error"))
            .collect();
        let first = failed.first().unwrap_or_else(|| panic!("{history}"));
        assert_eq!(
            first.split_whitespace().nth(1),
            Some("activate"),
            "{history}"
        );
        assert!(first.contains(sqlstate), "{attribute}: {first}");
        assert!(s.current().is_none(), "nothing was published");
        assert_eq!(
            login(&role, &format!("start-{role}")),
            Ok(()),
            "{attribute}: the password was never changed"
        );

        // With the attribute back, the same admin rotates.
        admin_exec(&printed[0]);
        let out = s.cli_with_dsn(&dsn, &["rotate", "db"]);
        assert!(out.status.success(), "{attribute}: {}", stderr(&out));
        assert_eq!(login(&role, &s.current().unwrap().password), Ok(()));
    }
}
