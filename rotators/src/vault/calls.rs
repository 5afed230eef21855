//! The Vault API calls of the credential rotators, as plain JSON requests.
//!
//! `vaultrs` lacks fields the rotators need (a secret-id's `ttl` and `num_uses`, PKI's
//! `private_key_format`) and types some answers more strictly than OpenBao fills them, so the
//! rotators send their own small requests through its client ([`Call`]) and read the answers
//! as JSON. Also here: the checks of the names a configuration puts into an API path.

use std::marker::PhantomData;

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vaultrs::error::ClientError;

/// One API request: a method, a path below `/v1/` and an optional JSON body; its answer's
/// `data` is read as `R`.
pub(crate) struct Call<R> {
    method: RequestMethod,
    path: String,
    body: Option<Value>,
    answer: PhantomData<fn() -> R>,
}

impl<R> Call<R> {
    /// A `GET` of `path`.
    pub(crate) fn read(path: impl Into<String>) -> Self {
        Self::new(RequestMethod::GET, path.into(), None)
    }

    /// A `LIST` of `path`.
    pub(crate) fn list(path: impl Into<String>) -> Self {
        Self::new(RequestMethod::LIST, path.into(), None)
    }

    /// A `POST` of `body` to `path`.
    pub(crate) fn write(path: impl Into<String>, body: Value) -> Self {
        Self::new(RequestMethod::POST, path.into(), Some(body))
    }

    fn new(method: RequestMethod, path: String, body: Option<Value>) -> Self {
        Self {
            method,
            path,
            body,
            answer: PhantomData,
        }
    }
}

impl<R: DeserializeOwned + Send + Sync> Endpoint for Call<R> {
    type Response = R;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(self
            .body
            .as_ref()
            .map(|b| serde_json::to_vec(b).expect("a JSON value serializes")))
    }
}

/// The HTTP status of a failed call, when Vault answered at all.
fn status(err: &ClientError) -> Option<u16> {
    match err {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

/// A call's result with Vault's 404 as `None` (no such secret-id; LIST with nothing to list).
pub(crate) fn or_missing<T>(result: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if status(&e) == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks a mount path written in the configuration (`approle`, `team/pki`). The error starts
/// with `field`.
pub(crate) fn check_mount(field: &str, mount: &str) -> Result<(), String> {
    check_path(field, mount, "a mount path")
}

/// Checks a Vault path (a mount, a namespace, a secret's path): parts of letters, digits and
/// `-_.`, no `.`/`..` part, separated by single `/`. The error starts with `field` and calls
/// the value `what` (`a mount path`).
pub(crate) fn check_path(field: &str, value: &str, what: &str) -> Result<(), String> {
    if !value.is_empty() && value.split('/').all(|part| check_part(part).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{value}` is not {what} (letters, digits, `-_.`, parts separated by `/`)"
        ))
    }
}

/// Checks a name that becomes one segment of an API path (a role name).
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), String> {
    check_part(name).map_err(|()| {
        format!("{field}: `{name}` is not a Vault name (letters, digits and `-_.`, not `.`/`..`)")
    })
}

fn check_part(part: &str) -> Result<(), ()> {
    let valid = !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_and_names_are_single_clean_path_parts() {
        check_mount("mount", "approle").unwrap();
        check_mount("mount", "team-a/pki_int").unwrap();
        for bad in [
            "", "/pki", "pki/", "a//b", "../sys", "a b", "pki?x", "a/./b",
        ] {
            let err = check_mount("mount", bad).unwrap_err();
            assert!(err.starts_with("mount: "), "{err}");
        }
        check_name("role_name", "web-01.v2").unwrap();
        for bad in ["", "a/b", "..", "x y", "r%2F"] {
            assert!(check_name("role_name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_status_of_an_api_error() {
        let e = ClientError::APIError {
            code: 404,
            errors: vec![],
        };
        assert_eq!(status(&e), Some(404));
        assert_eq!(status(&ClientError::ResponseEmptyError), None);
    }
}
