//! The `file` store's sidecar, `path.keyrotd`: which rotation the current, previous and
//! promoting files belong to. It makes `promote` and `release_previous` idempotent and lets the
//! engine find the last rotation after its state was lost.
//!
//! Invariant: the sidecar holds no secret material, and only the service user may read it.

use std::ffi::OsString;

use serde::{Deserialize, Serialize};

use super::dir::{Perms, StoreDir};
use super::FileStore;
use keyrotd_plugin::ProviderError;

/// Non-secret bookkeeping kept in `path.keyrotd`.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Meta {
    /// The rotation whose value is at `path`.
    pub(super) current: Option<String>,
    /// The rotation whose value is at `path.previous`.
    pub(super) previous: Option<String>,
    /// The rotation being promoted: set before the rename, cleared after it.
    pub(super) promoting: Option<String>,
}

impl FileStore {
    /// The sidecar's name in the store's directory.
    fn meta_name(&self) -> OsString {
        self.sibling(".keyrotd")
    }

    /// The sidecar's content; an empty one when there is no sidecar yet.
    pub(super) fn read_meta(&self, dir: &StoreDir) -> Result<Meta, ProviderError> {
        let name = self.meta_name();
        match dir.read(&name)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::permanent(format!(
                    "{} is corrupt: {e}",
                    dir.path_of(&name).display()
                ))
            }),
            None => Ok(Meta::default()),
        }
    }

    /// The sidecar holds no secret, so only the service user needs it.
    pub(super) fn write_meta(&self, dir: &StoreDir, meta: &Meta) -> Result<(), ProviderError> {
        let bytes = serde_json::to_vec(meta).expect("Meta serializes");
        dir.write(&self.meta_name(), &bytes, Perms::PRIVATE)
    }
}
