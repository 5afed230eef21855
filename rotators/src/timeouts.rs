//! The `connect_timeout` and `timeout` fields as provider configs deserialize them. What they
//! mean, their defaults and their bounds are the plugin API's ([`keyrotd_plugin::timeouts`]),
//! re-exported here for the provider modules.

use std::time::Duration;

use serde::Deserialize;

pub use keyrotd_plugin::timeouts::{
    describe, validate, Timeouts, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
};

pub(crate) fn default_connect() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

pub(crate) fn default_call() -> Duration {
    DEFAULT_TIMEOUT
}

/// Deserializes a duration written like `"10s"` or `"1m30s"` (serde `deserialize_with`).
pub(crate) fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration like \"10s\" or \"1m30s\": {e}"
        ))
    })
}
