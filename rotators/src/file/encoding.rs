//! How the `file` store writes a credential into its file and reads it back: the secret alone
//! (`raw`) or a JSON object of the secret and the credential's attributes (`json`).
//!
//! Invariant: decoding errors name the file and what is wrong with it, never its content.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use keyrotd_plugin::{Attrs, Credential, ProviderError};

/// How the credential is written into the file: the `format` field of [`FileConfig`](super::FileConfig).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The secret value and nothing else.
    #[default]
    Raw,
    /// `{"<secret field>": "...", "<attr>": "...", ...}`
    Json,
}

impl Encoding {
    /// The file's content for `credential`; `secret_field` names the secret in a JSON object.
    pub(super) fn encode(self, secret_field: &str, credential: &Credential) -> Vec<u8> {
        match self {
            Self::Raw => credential.secret.expose_secret().as_bytes().to_vec(),
            Self::Json => {
                let mut object: serde_json::Map<String, serde_json::Value> = credential
                    .attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                object.insert(
                    secret_field.to_owned(),
                    credential.secret.expose_secret().into(),
                );
                serde_json::to_vec(&object).expect("a map of strings serializes")
            }
        }
    }

    /// The credential in a file's content; `path` names the file in errors.
    pub(super) fn decode(
        self,
        path: &Path,
        secret_field: &str,
        bytes: Vec<u8>,
    ) -> Result<Credential, ProviderError> {
        let bad = |what: &str| ProviderError::permanent(format!("{} {what}", path.display()));
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8"))?;
        match self {
            Self::Raw => Ok(Credential {
                secret: SecretString::from(text),
                attrs: Attrs::new(),
            }),
            Self::Json => {
                // serde_json's errors quote no input, so they are safe to report.
                let object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&text)
                        .map_err(|e| bad(&format!("is not a JSON object ({:?})", e.classify())))?;
                let mut attrs = Attrs::new();
                let mut secret = None;
                for (key, value) in object {
                    let serde_json::Value::String(value) = value else {
                        continue;
                    };
                    if key == secret_field {
                        secret = Some(SecretString::from(value));
                    } else {
                        attrs.insert(key, value);
                    }
                }
                let secret =
                    secret.ok_or_else(|| bad(&format!("has no string field `{secret_field}`")))?;
                Ok(Credential { secret, attrs })
            }
        }
    }
}
