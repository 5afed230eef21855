//! AWS providers: the `aws_secrets_manager` store and the `aws_iam_access_key` rotator.
//!
//! - [`secrets_manager`]: a store that keeps the credential in a Secrets Manager secret and uses
//!   AWS's own staging labels (`AWSPENDING`, `AWSCURRENT`, `AWSPREVIOUS`) for its versions;
//! - [`iam`]: a dual-phase rotator for an IAM user's access keys, verified with STS.
//!
//! Both reach AWS with the credentials of the standard chain (environment, profile, IMDS or web
//! identity), optionally with a region and an endpoint override per credential. The SDK
//! configuration is loaded lazily on first use, because building a plugin is synchronous and
//! must not touch the network. Every call has the plugin's `connect_timeout` and, all SDK retries
//! included, its `timeout` (see [`crate::timeouts`]): an endpoint that accepts the connection and
//! never answers fails the call as a transient `TimeoutError`.
//!
//! Invariant: no error, log line or `Debug` output here contains a secret value. AWS error
//! messages never echo secret values, so they are quoted as they are.

pub mod iam;
pub mod secrets_manager;

use std::error::Error;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_iam::config::http::HttpResponse;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::sync::OnceCell;

use keyrotd_plugin::{ErrorClass, ProviderError, Timeouts};

/// How many times the SDK tries one call (throttling and 5xx answers are retried inside it).
const MAX_ATTEMPTS: u32 = 3;

/// Where the SDK connects: the region, endpoint and timeouts of one credential's configuration.
#[derive(Debug)]
pub(crate) struct Connection {
    region: Option<String>,
    endpoint_url: Option<String>,
    timeouts: Timeouts,
    config: OnceCell<SdkConfig>,
}

impl Connection {
    pub(crate) fn new(
        region: Option<String>,
        endpoint_url: Option<String>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            region,
            endpoint_url,
            timeouts,
            config: OnceCell::new(),
        }
    }

    /// The SDK configuration, loaded from the standard chain on first use.
    pub(crate) async fn sdk_config(&self) -> &SdkConfig {
        self.config
            .get_or_init(|| {
                load_sdk_config(
                    self.region.as_deref(),
                    self.endpoint_url.as_deref(),
                    self.timeouts,
                )
            })
            .await
    }
}

/// Loads an SDK configuration from the standard chain (environment, profile, IMDS, web identity),
/// with an optional region and endpoint override, the HTTPS client keyrotd uses, and `timeouts`:
/// the connect timeout, and the deadline of each call with its retries.
pub async fn load_sdk_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    timeouts: Timeouts,
) -> SdkConfig {
    // rustls on ring: the SDK's default client builds aws-lc, which is slow to compile and
    // brings nothing keyrotd needs.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeout_config = TimeoutConfig::builder()
        .connect_timeout(timeouts.connect)
        .operation_timeout(timeouts.call)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeout_config)
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// AWS error codes that mean "try again later".
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalServiceError",
    "InternalServiceErrorException",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Turns an SDK error into a [`ProviderError`] naming the AWS operation (`IAM CreateAccessKey`)
/// and its target, with the AWS error code attached when the service sent one.
///
/// Throttling, 5xx answers, timeouts and failed connections are transient; everything else the
/// service refused (access denied, not found, limits, bad tokens) is permanent.
pub(crate) fn aws_error<E>(
    operation: &str,
    target: &str,
    err: SdkError<E, HttpResponse>,
) -> ProviderError
where
    E: ProvideErrorMetadata + Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = error_code(&err);
    let class = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => ErrorClass::Transient,
        SdkError::ConstructionFailure(_) => ErrorClass::Permanent,
        _ if code
            .as_deref()
            .is_some_and(|c| TRANSIENT_CODES.contains(&c)) =>
        {
            ErrorClass::Transient
        }
        _ if status.is_some_and(|s| s >= 500 || s == 429) => ErrorClass::Transient,
        SdkError::ResponseError(_) => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    };
    let detail = match (&err, err.message()) {
        (SdkError::ServiceError(_), Some(message)) => message.to_owned(),
        (SdkError::ServiceError(_), None) => match status {
            Some(status) => format!("HTTP status {status}"),
            None => "no message".to_owned(),
        },
        _ => one_line(&err),
    };
    let error = ProviderError {
        class,
        code: None,
        message: format!("{operation} on {target} failed: {detail}"),
    };
    match code {
        Some(code) => error.with_code(code),
        None => error,
    }
}

/// An error and its causes as one line of their `Display` texts. (`DisplayErrorContext` ends
/// with a `Debug` dump of the whole error, `DispatchFailure(DispatchFailure { source: ...`, which
/// is unreadable in a log line, a journal row or an alert.)
fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Whether `err` carries the AWS error code `code`.
pub(crate) fn has_code<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
    code: &str,
) -> bool {
    error_code(err).as_deref() == Some(code)
}

/// The AWS error code of a service error (public for the tests that call AWS behind the
/// rotators' back).
///
/// Falls back to the `<Code>` element of an XML body the SDK could not parse: the query protocol
/// (IAM, STS) expects `<ErrorResponse><Error>`, but some front ends (moto's authentication
/// layer among them) wrap it as `<ErrorResponse><Errors><Error>`, which loses the code.
pub fn error_code<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<String> {
    if let Some(code) = err.code() {
        return Some(code.to_owned());
    }
    let SdkError::ServiceError(service) = err else {
        return None;
    };
    let body = std::str::from_utf8(service.raw().body().bytes()?).ok()?;
    let (_, rest) = body.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    let code = code.trim();
    let plausible = !code.is_empty()
        && code.len() <= 64
        && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    plausible.then(|| code.to_owned())
}

/// Checks an optional `endpoint_url`: an absolute https URL, or http to a loopback host.
pub(crate) fn validate_endpoint_url(url: Option<&str>) -> Result<(), String> {
    let Some(url) = url else { return Ok(()) };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("endpoint_url: `{url}` must start with http:// or https://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains('@') || host.contains(char::is_whitespace) {
        return Err(format!("endpoint_url: `{url}` has no valid host"));
    }
    if let Some((_, port)) = host.rsplit_once(':').filter(|_| !host.ends_with(']')) {
        if port.parse::<u16>().is_err() {
            return Err(format!("endpoint_url: `{url}` has an invalid port"));
        }
    }
    if url.starts_with("http://") {
        // Plain HTTP carries the request signatures and, for Secrets Manager and IAM, the
        // secrets themselves: only where no network can read them.
        let parsed = url::Url::parse(url)
            .map_err(|e| format!("endpoint_url: `{url}` is not a valid URL ({e})"))?;
        if !parsed
            .host_str()
            .is_some_and(keyrotd_plugin::is_loopback_host)
        {
            return Err(format!(
                "endpoint_url: `{url}` uses plain http, which is allowed only to a loopback host \
                 (127.0.0.0/8, ::1, localhost); use https"
            ));
        }
    }
    Ok(())
}

/// The account id for the ARNs of `keyrotd policy`, or `*` with a note saying so when the
/// configuration names none.
pub(crate) fn account_or_wildcard(account_id: Option<&str>) -> (&str, Option<String>) {
    match account_id {
        Some(account) => (account, None),
        None => (
            "*",
            Some(
                "no AWS account id is configured, so the ARNs match any account (`*`): set \
                 `account_id` in the inventory's [aws] table to name yours"
                    .to_owned(),
            ),
        ),
    }
}

/// Checks an optional `account_id`: twelve digits.
pub(crate) fn validate_account_id(account_id: Option<&str>) -> Result<(), String> {
    match account_id {
        Some(a) if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "account_id: `{a}` is not an AWS account id (twelve digits)"
        )),
        _ => Ok(()),
    }
}

/// Checks an optional `region`: lowercase letters, digits and dashes (`us-east-1`).
pub(crate) fn validate_region(region: Option<&str>) -> Result<(), String> {
    match region {
        Some(r)
            if r.is_empty()
                || !r
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Err(format!(
                "region: `{r}` is not an AWS region name like us-east-1"
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_iam::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_iam::operation::create_access_key::CreateAccessKeyError;
    use aws_smithy_types::body::SdkBody;

    use super::*;

    fn service_error(
        status: u16,
        code: Option<&str>,
        body: &str,
    ) -> SdkError<CreateAccessKeyError, HttpResponse> {
        let mut meta = ErrorMetadata::builder().message("the service said no");
        if let Some(code) = code {
            meta = meta.code(code);
        }
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::from(body));
        SdkError::service_error(CreateAccessKeyError::generic(meta.build()), raw)
    }

    fn classify(err: SdkError<CreateAccessKeyError, HttpResponse>) -> (ErrorClass, Option<String>) {
        let e = aws_error("IAM CreateAccessKey", "IAM user `app`", err);
        assert!(
            e.message
                .starts_with("IAM CreateAccessKey on IAM user `app` failed: "),
            "{e}"
        );
        (e.class, e.code)
    }

    #[test]
    fn classifies_sdk_errors() {
        use ErrorClass::*;
        let some = |c: &str| Some(c.to_owned());
        for code in [
            "Throttling",
            "ThrottlingException",
            "ServiceUnavailable",
            "InternalFailure",
        ] {
            assert_eq!(
                classify(service_error(400, Some(code), "")),
                (Transient, some(code))
            );
        }
        for code in [
            "AccessDenied",
            "AccessDeniedException",
            "NoSuchEntity",
            "ResourceNotFoundException",
            "LimitExceeded",
            "InvalidClientTokenId",
        ] {
            assert_eq!(
                classify(service_error(403, Some(code), "")),
                (Permanent, some(code))
            );
        }
        assert_eq!(classify(service_error(503, None, "")), (Transient, None));
        assert_eq!(classify(service_error(429, None, "")), (Transient, None));
        assert_eq!(classify(SdkError::timeout_error("slow")), (Transient, None));
        let refused =
            ConnectorError::io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        assert_eq!(
            classify(SdkError::dispatch_failure(refused)),
            (Transient, None)
        );
    }

    #[test]
    fn transport_errors_read_as_one_line_without_debug_dumps() {
        let refused =
            ConnectorError::io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        let e = aws_error(
            "IAM CreateAccessKey",
            "IAM user `app`",
            SdkError::<CreateAccessKeyError, HttpResponse>::dispatch_failure(refused),
        );
        let text = e.to_string();
        assert!(text.contains("connection refused"), "{text}");
        for dump in ["DispatchFailure(", "ConnectorError", "{", "\n"] {
            assert!(!text.contains(dump), "{text}");
        }
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn recovers_the_code_from_a_wrapped_query_error() {
        let body =
            "<ErrorResponse><Errors><Error><Code>InvalidClientTokenId</Code><Message>bad</Message>\
                    </Error></Errors></ErrorResponse>";
        let err = service_error(403, None, body);
        assert!(has_code(&err, "InvalidClientTokenId"));
        assert_eq!(
            classify(err),
            (
                ErrorClass::Permanent,
                Some("InvalidClientTokenId".to_owned())
            )
        );
        let junk = service_error(403, None, "<Code>not a code, with spaces</Code>");
        assert_eq!(classify(junk).1, None);
    }

    #[test]
    fn endpoint_urls() {
        assert!(validate_endpoint_url(None).is_ok());
        assert!(validate_endpoint_url(Some("http://127.0.0.1:5000")).is_ok());
        assert!(
            validate_endpoint_url(Some("https://secretsmanager.eu-west-1.amazonaws.com/")).is_ok()
        );
        assert!(validate_endpoint_url(Some("127.0.0.1:5000"))
            .unwrap_err()
            .starts_with("endpoint_url:"));
        assert!(validate_endpoint_url(Some("http://")).is_err());
        assert!(validate_endpoint_url(Some("http://host:port")).is_err());
        assert!(validate_endpoint_url(Some("http://u:p@host")).is_err());
        for loopback in [
            "http://localhost:5000",
            "http://[::1]:5000/",
            "http://127.3.2.1",
        ] {
            assert!(validate_endpoint_url(Some(loopback)).is_ok(), "{loopback}");
        }
        for remote in [
            "http://iam.amazonaws.com",
            "http://10.0.0.5:5000",
            "http://127.0.0.1.nip.io:5000",
            "http://[2001:db8::1]/",
        ] {
            let e = validate_endpoint_url(Some(remote)).unwrap_err();
            assert!(
                e.starts_with("endpoint_url:") && e.contains("plain http"),
                "{remote}: {e}"
            );
        }
        assert!(validate_endpoint_url(Some("https://10.0.0.5:5000")).is_ok());
    }

    #[test]
    fn regions() {
        assert!(validate_region(Some("eu-west-1")).is_ok());
        assert!(validate_region(Some("EU West"))
            .unwrap_err()
            .starts_with("region:"));
    }
}
