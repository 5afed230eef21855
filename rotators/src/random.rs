//! The `random` rotator: a password or token drawn from the operating system's randomness.
//!
//! It has no provider to talk to: the value is live as soon as consumers read it from the store,
//! so `activate`, `abandon` and `revoke` have nothing to do, and `verify` checks the value against
//! the configured policy.

use async_trait::async_trait;
use rand::rngs::OsRng;
use rand::{Rng, TryRngCore};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use keyrotd_plugin::{Attrs, Credential, ProviderError, Rotator, StepContext};

/// Configuration of the `random` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomConfig {
    /// Number of characters (16 to 4096).
    #[serde(default = "default_length")]
    pub length: usize,
    /// Which characters may appear.
    #[serde(default)]
    pub alphabet: Alphabet,
    /// Name of the secret field when the store writes JSON.
    #[serde(default = "default_field")]
    pub field: String,
}

fn default_length() -> usize {
    32
}

fn default_field() -> String {
    "password".into()
}

/// The characters a generated value is drawn from.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Alphabet {
    /// `A-Z a-z 0-9`
    #[default]
    Alphanumeric,
    /// `0-9 a-f`
    Hex,
    /// `A-Z a-z 0-9 - _`
    Base64url,
    /// Alphanumerics plus punctuation that needs no quoting in shells, URLs or connection strings.
    Symbols,
}

impl Alphabet {
    fn chars(self) -> &'static [u8] {
        const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        match self {
            Self::Alphanumeric => ALNUM,
            Self::Hex => b"0123456789abcdef",
            Self::Base64url => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            Self::Symbols => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+="
            }
        }
    }
}

impl RandomConfig {
    /// Checks the policy; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if !(16..=4096).contains(&self.length) {
            return Err(format!(
                "length: must be between 16 and 4096, got {}",
                self.length
            ));
        }
        if self.field.is_empty() {
            return Err("field: must not be empty".into());
        }
        Ok(())
    }
}

/// Generates `length` characters from `alphabet` with the OS random number generator.
pub fn generate(length: usize, alphabet: Alphabet) -> SecretString {
    let chars = alphabet.chars();
    let mut rng = OsRng.unwrap_err();
    let value: String = (0..length)
        .map(|_| chars[rng.random_range(0..chars.len())] as char)
        .collect();
    SecretString::from(value)
}

/// The `random` rotator.
#[derive(Debug)]
pub struct RandomRotator {
    config: RandomConfig,
}

impl RandomRotator {
    /// Builds the rotator from a validated configuration.
    pub fn new(config: RandomConfig) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Rotator for RandomRotator {
    fn kind(&self) -> &'static str {
        "random"
    }

    fn secret_field(&self) -> &str {
        &self.config.field
    }

    async fn issue(
        &self,
        _ctx: StepContext<'_>,
        _current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        Ok(Credential {
            secret: generate(self.config.length, self.config.alphabet),
            attrs: Attrs::new(),
        })
    }

    async fn verify(&self, _ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let value = new.secret.expose_secret();
        let allowed = self.config.alphabet.chars();
        if value.len() != self.config.length || !value.bytes().all(|b| allowed.contains(&b)) {
            return Err(ProviderError::permanent(
                "value does not match the configured length and alphabet",
            ));
        }
        Ok(())
    }

    async fn abandon(
        &self,
        _: StepContext<'_>,
        _: Option<&Attrs>,
        _: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn revoke(&self, _ctx: StepContext<'_>, _old: &Attrs) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_the_configured_length_and_alphabet() {
        for alphabet in [
            Alphabet::Alphanumeric,
            Alphabet::Hex,
            Alphabet::Base64url,
            Alphabet::Symbols,
        ] {
            let v = generate(64, alphabet);
            assert_eq!(v.expose_secret().len(), 64);
            assert!(v
                .expose_secret()
                .bytes()
                .all(|b| alphabet.chars().contains(&b)));
        }
        assert_ne!(
            generate(32, Alphabet::Hex).expose_secret(),
            generate(32, Alphabet::Hex).expose_secret()
        );
    }

    #[test]
    fn refuses_weak_lengths() {
        let c = RandomConfig {
            length: 8,
            alphabet: Alphabet::Hex,
            field: "password".into(),
        };
        assert!(c.validate().unwrap_err().starts_with("length:"));
    }
}
