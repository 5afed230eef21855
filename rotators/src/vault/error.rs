//! Vault's answers as [`ProviderError`]s.
//!
//! Transient: no connection, a timeout, 429, 5xx (503 is a sealed or standby server). Permanent:
//! everything else Vault refuses (400 bad input or a CAS mismatch, 403, 404). A 403 is also what
//! an expired or revoked token gets; [`super::VaultSession::call`] tells the two apart before
//! this classification stands. Messages carry Vault's own error strings, which name paths and
//! reasons but no values, and never a response body.

use keyrotd_plugin::ProviderError;
use vaultrs::error::ClientError;

/// The longest Vault error text kept in a message.
const MAX_VAULT_TEXT: usize = 300;

/// Classifies `err`, the failure of the call described by `what` (`read secret/data/app`).
pub(super) fn classify(what: &str, err: &ClientError) -> ProviderError {
    match err {
        ClientError::APIError { code, errors } => {
            let mut said = tidy(errors);
            if said.is_empty() {
                said = "no error text".into();
            }
            if said.len() > MAX_VAULT_TEXT {
                let mut end = MAX_VAULT_TEXT;
                while !said.is_char_boundary(end) {
                    end -= 1;
                }
                said.truncate(end);
                said.push('…');
            }
            let message = format!("{what}: Vault answered {code}: {said}");
            let error = if *code == 429 || *code >= 500 {
                ProviderError::transient(message)
            } else {
                ProviderError::permanent(message)
            };
            error.with_code(code.to_string())
        }
        ClientError::RestClientError { source } => transport(what, source),
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            ProviderError::permanent(format!("{what}: Vault's answer held no data"))
        }
        ClientError::WrapInvalidError => ProviderError::permanent(format!(
            "{what}: the response-wrapping token is invalid, expired or already unwrapped"
        )),
        // The remaining variants describe a local problem (a file, a certificate, a builder
        // setting) in texts that name paths at most.
        other => ProviderError::permanent(format!("{what}: {other}")),
    }
}

/// Vault's error strings on one line: `1 error occurred:\n\t* permission denied\n\n` becomes
/// `permission denied`.
fn tidy(errors: &[String]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| {
            let flat = e.split_whitespace().collect::<Vec<_>>().join(" ");
            match flat.split_once(" occurred: * ") {
                Some((head, rest)) if head.ends_with("error") || head.ends_with("errors") => {
                    rest.replace(" * ", "; ")
                }
                _ => flat,
            }
        })
        .filter(|e| !e.is_empty())
        .collect();
    parts.join("; ")
}

/// A failure below Vault's API: the request never got an answer, or the answer was not JSON.
fn transport(what: &str, err: &rustify::errors::ClientError) -> ProviderError {
    use rustify::errors::ClientError as Rest;
    match err {
        Rest::RequestError { source, .. } => {
            let timed_out = source
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout);
            if timed_out {
                ProviderError::transient(format!("{what}: Vault did not answer in time"))
                    .with_code("timeout")
            } else {
                ProviderError::transient(format!("{what}: could not reach Vault"))
                    .with_code("connect")
            }
        }
        Rest::ServerResponseError { code, .. } => {
            let message = format!("{what}: Vault answered {code}");
            if *code == 429 || *code >= 500 {
                ProviderError::transient(message)
            } else {
                ProviderError::permanent(message)
            }
            .with_code(code.to_string())
        }
        // The body is not shown: it may hold a secret.
        Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => {
            ProviderError::transient(format!("{what}: Vault's answer was not the expected JSON"))
        }
        _ => ProviderError::transient(format!("{what}: the request to Vault failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyrotd_plugin::ErrorClass;

    fn api(code: u16, errors: &[&str]) -> ClientError {
        ClientError::APIError {
            code,
            errors: errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn server_errors_and_throttling_are_transient_the_rest_permanent() {
        for (code, class) in [
            (503, ErrorClass::Transient),
            (500, ErrorClass::Transient),
            (429, ErrorClass::Transient),
            (400, ErrorClass::Permanent),
            (403, ErrorClass::Permanent),
            (404, ErrorClass::Permanent),
        ] {
            let e = classify("write secret/data/app", &api(code, &["no"]));
            assert_eq!(e.class, class, "{code}");
            assert_eq!(e.code.as_deref(), Some(code.to_string().as_str()));
            assert!(
                e.message
                    .starts_with(&format!("write secret/data/app: Vault answered {code}: no")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn vaults_multi_error_text_is_put_on_one_line() {
        let e = classify(
            "read",
            &api(403, &["1 error occurred:\n\t* permission denied\n\n"]),
        );
        assert_eq!(e.message, "read: Vault answered 403: permission denied");
        let e = classify(
            "read",
            &api(400, &["2 errors occurred:\n\t* a\n\t* b\n\n", "c"]),
        );
        assert_eq!(e.message, "read: Vault answered 400: a; b; c");
    }

    #[test]
    fn long_error_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(400);
        let e = classify("read", &api(400, &[&long]));
        assert!(e.message.len() < 400 + 40, "{}", e.message.len());
        assert!(e.message.ends_with('…'));
    }

    #[test]
    fn a_response_body_is_never_shown() {
        let e = classify(
            "read",
            &ClientError::RestClientError {
                source: rustify::errors::ClientError::ResponseParseError {
                    source: anyhow_free_error(),
                    content: Some("{\"data\":{\"password\":\"hunter2\"}}".into()),
                },
            },
        );
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        assert_eq!(e.class, ErrorClass::Transient);
    }

    fn anyhow_free_error() -> anyhow::Error {
        anyhow::Error::msg("expected value")
    }
}
