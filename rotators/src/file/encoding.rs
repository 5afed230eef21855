//! How the `file` store writes a credential into its file and reads it back: the secret alone
//! (`raw`), a JSON object of the secret and the credential's attributes (`json`), or, for a TLS
//! certificate, one PEM file of the certificate, its chain and the private key (`pem_bundle`),
//! which nginx, HAProxy and most TLS servers read as both certificate and key file.
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
    /// The attributes `certificate` and `ca_chain` (PEM), then the secret (a PEM private key),
    /// one block after the other; read back by the blocks' labels.
    PemBundle,
}

/// The attributes [`Encoding::PemBundle`] writes before the key, in this order.
const PEM_ATTRS: [&str; 2] = ["certificate", "ca_chain"];

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
            Self::PemBundle => {
                let mut text = String::new();
                for attr in PEM_ATTRS {
                    if let Some(pem) = credential.attrs.get(attr).filter(|p| !p.is_empty()) {
                        text.push_str(pem);
                        text.push('\n');
                    }
                }
                text.push_str(credential.secret.expose_secret());
                text.push('\n');
                text.into_bytes()
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
            Self::PemBundle => {
                let (mut key, mut certs) = (None, Vec::new());
                for (label, block) in pem_blocks(&text) {
                    if label.ends_with("PRIVATE KEY") && key.is_none() {
                        key = Some(block);
                    } else if label == "CERTIFICATE" {
                        certs.push(block);
                    }
                }
                let key = key.ok_or_else(|| bad("has no PEM private key block"))?;
                let mut attrs = Attrs::new();
                if !certs.is_empty() {
                    attrs.insert(PEM_ATTRS[0].into(), certs.remove(0).into());
                    attrs.insert(PEM_ATTRS[1].into(), certs.join("\n"));
                }
                Ok(Credential {
                    secret: SecretString::from(key.to_owned()),
                    attrs,
                })
            }
        }
    }
}

/// The PEM blocks of `text`, each as its label and its text from `-----BEGIN` to the end of its
/// `-----END ...-----` line; text between blocks is skipped.
fn pem_blocks(text: &str) -> Vec<(&str, &str)> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(label) = block["-----BEGIN ".len()..]
            .split_once("-----")
            .map(|(label, _)| label)
        else {
            break;
        };
        let end_line = format!("-----END {label}-----");
        let Some(end) = block.find(&end_line) else {
            break;
        };
        let len = end + end_line.len();
        blocks.push((label, &block[..len]));
        rest = &block[len..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_bundle_reads_back_exactly_what_was_written() {
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----";
        let credential = Credential {
            secret: SecretString::from(key.to_owned()),
            attrs: Attrs::from([
                ("certificate".into(), "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----".into()),
                ("ca_chain".into(), "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nDDDD\n-----END CERTIFICATE-----".into()),
                ("serial_number".into(), "01:02".into()),
            ]),
        };
        let bytes = Encoding::PemBundle.encode("private_key", &credential);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with("-----BEGIN CERTIFICATE-----\nBBBB"),
            "{text}"
        );
        assert!(text.ends_with("-----END PRIVATE KEY-----\n"), "{text}");
        let back = Encoding::PemBundle
            .decode(Path::new("/b.pem"), "private_key", bytes)
            .unwrap();
        assert_eq!(back.secret.expose_secret(), key);
        assert_eq!(back.attrs["certificate"], credential.attrs["certificate"]);
        assert_eq!(back.attrs["ca_chain"], credential.attrs["ca_chain"]);
        let err = Encoding::PemBundle
            .decode(
                Path::new("/b.pem"),
                "k",
                b"-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".to_vec(),
            )
            .unwrap_err();
        assert_eq!(err.message, "/b.pem has no PEM private key block");
    }
}
