//! AWS errors carry their code and name the operation, and `aws-sm:` secret references resolve
//! AWSCURRENT against moto.

use super::*;

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn errors_carry_the_aws_code_and_name_the_operation() {
    let admin = admin().await;
    let rid = rotation_id("errors", 1);
    let ctx = ctx(&rid, SystemTime::now());

    let missing = store("errors/no-such-secret", None);
    let err = missing.current(ctx).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "ResourceNotFoundException",
        "Secrets Manager DescribeSecret",
    );
    assert!(err.to_string().contains("errors/no-such-secret"), "{err}");
    let err = missing.stage(ctx, &cred("never-shown")).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "ResourceNotFoundException",
        "Secrets Manager",
    );
    assert!(!err.to_string().contains("never-shown"));

    let nobody = rotator("errors-no-such-user", "1s", true);
    let err = nobody.issue(ctx, None).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "NoSuchEntity",
        "IAM ListAccessKeys",
    );
    let attrs = Attrs::from([("AccessKeyId".to_owned(), "AKIAIOSFODNN7EXAMPLE".to_owned())]);
    let err = nobody.revoke(ctx, &attrs).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "NoSuchEntity",
        "IAM UpdateAccessKey",
    );

    // A JSON secret without the configured member, and a value that is not JSON.
    sm(&admin)
        .create_secret()
        .name("errors/json")
        .secret_string(r#"{"username":"app","pass":"hunter2"}"#)
        .send()
        .await
        .unwrap();
    let err = store("errors/json", Some("password"))
        .current(ctx)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(err.message.contains("no string member `password`"), "{err}");
    assert!(!err.to_string().contains("hunter2"));
    sm(&admin)
        .create_secret()
        .name("errors/plain")
        .secret_string("hunter2-plain")
        .send()
        .await
        .unwrap();
    let err = store("errors/plain", Some("password"))
        .current(ctx)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("not a JSON object") && !err.to_string().contains("hunter2"),
        "{err}"
    );
    let err = store("errors/plain", Some("password"))
        .stage(ctx, &cred("x"))
        .await
        .unwrap_err();
    assert!(err.message.contains("not a JSON object"), "{err}");

    // A refused signature (a wrong secret for a real key id) is permanent and carries the code.
    create_user(&admin, "errors-user").await;
    let key = create_key(&admin, "errors-user").await;
    let wrong = Credential {
        secret: SecretString::from("not-the-secret".to_owned()),
        attrs: key.attrs.clone(),
    };
    let err = rotator("errors-user", "1s", true)
        .verify(ctx, &wrong)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.code.is_some(), "{err}");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn aws_sm_secret_references_resolve_awscurrent_against_moto() {
    use keyrotd_plugin::reference::{RefError, SecretRef};
    use keyrotd_providers::resolve::Resolve;
    let admin = admin().await;
    let _endpoint = aws_env::endpoint(&moto_url()).await;
    let name = "refs/admin-dsn";
    let created = sm(&admin)
        .create_secret()
        .name(name)
        .secret_string(r#"{"username":"admin","password":"ref-pw-0","port":5432}"#)
        .send()
        .await
        .unwrap();
    let arn = created.arn().unwrap().to_owned();
    let resolve = |text: String| async move {
        let r: SecretRef = text.parse().unwrap();
        assert!(
            matches!(r.resolve(), Err(RefError::NeedsAsync(_))),
            "{text}"
        );
        r.resolve_async(Timeouts::default()).await
    };

    let field = resolve(format!("aws-sm:{name}#password")).await.unwrap();
    assert_eq!(field.expose_secret(), "ref-pw-0");
    let whole = resolve(format!("aws-sm:{name}")).await.unwrap();
    let whole: serde_json::Value = serde_json::from_str(whole.expose_secret()).unwrap();
    assert_eq!(whole["port"], 5432);
    let by_arn = resolve(format!("aws-sm:{arn}#username")).await.unwrap();
    assert_eq!(by_arn.expose_secret(), "admin");

    // A pending version is not what consumers read: AWSCURRENT is.
    sm(&admin)
        .put_secret_value()
        .secret_id(name)
        .client_request_token(rotation_id("refs", 1))
        .secret_string(r#"{"username":"admin","password":"ref-pw-pending"}"#)
        .version_stages("AWSPENDING")
        .send()
        .await
        .unwrap();
    let field = resolve(format!("aws-sm:{name}#password")).await.unwrap();
    assert_eq!(field.expose_secret(), "ref-pw-0");

    // Errors name the reference and carry the AWS code, never a value.
    let err = resolve(format!("aws-sm:{name}#pasword")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RefError::Remote { .. })
            && text.contains(&format!("aws-sm:{name}#pasword"))
            && text.contains("no string member `pasword`")
            && !text.contains("ref-pw"),
        "{text}"
    );
    let err = resolve("aws-sm:refs/no-such-secret#password".into())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("aws-sm:refs/no-such-secret#password")
            && text.contains("ResourceNotFoundException"),
        "{text}"
    );
    // An empty value is refused like an empty file.
    sm(&admin)
        .create_secret()
        .name("refs/empty")
        .secret_string(r#"{"password":""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resolve("aws-sm:refs/empty#password".into())
            .await
            .unwrap_err(),
        RefError::EmptyValue("aws-sm:refs/empty#password".into())
    );
}
