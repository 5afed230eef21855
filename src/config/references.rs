//! The reference checks run before a command acts: secret references resolvable and store
//! locations safe to write. Invariant: no secret value is read, and nothing is written.

use super::{ConfigError, ConfigErrors, CredentialSpec, Inventory};
use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;

/// Checks that every secret the inventory references is there (variables set, files readable),
/// without reading any of them, and that every store's location is safe to write as it is now
/// (for a file store: no special file or symlink at its names, no directory others can write). Run by `check`, `run` and `rotate`; not by `status` and
/// `history`, which an operator may run from a shell that lacks the daemon's environment.
pub fn check_references(inventory: &Inventory) -> Result<(), ConfigErrors> {
    let error = |c: &CredentialSpec, part: &str, message: String| ConfigError {
        file: inventory.path.clone(),
        line: c.place.0,
        column: c.place.1,
        field: format!("credential[{}].{part}", c.id),
        message,
    };
    let stores = inventory.credentials.iter().filter_map(|c| {
        let e = c.store.check_location().err()?;
        Some(error(c, "store", e))
    });
    let errors: Vec<ConfigError> = inventory
        .credentials
        .iter()
        .flat_map(|c| c.rotator.secret_refs().into_iter().map(move |r| (c, r)))
        .filter_map(|(c, (field, r))| {
            let e = r.check_available().err()?;
            Some(error(
                c,
                &format!("rotator.{field}"),
                format!("secret reference `{r}`: {e}"),
            ))
        })
        .chain(stores)
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads every `vault:` reference of the credentials' rotators through the `[vault]` connection,
/// for `keyrotd check`: one that cannot be read (no permission, no such field, Vault refuses the
/// login) is reported at its credential and field. The values are dropped unread.
pub async fn check_vault_references(inventory: &Inventory) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    for c in &inventory.credentials {
        for (field, r) in c.rotator.secret_refs() {
            if !matches!(r, SecretRef::Vault { .. }) {
                continue;
            }
            if let Err(e) = r.resolve_async(Timeouts::default()).await {
                errors.push(ConfigError {
                    file: inventory.path.clone(),
                    line: c.place.0,
                    column: c.place.1,
                    field: format!("credential[{}].rotator.{field}", c.id),
                    message: e.to_string(),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}
