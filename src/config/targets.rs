//! The duplicate-location check: two credentials must never write the same file, secret or
//! database role. Invariant: memory stays proportional to the number of targets, not to their
//! length, and a hash collision never reports a clash.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::path::Path;

use super::{ConfigError, CredentialSpec};

/// Refuses two credentials that change the same thing (a file, a secret, a database role): each
/// would overwrite the other's value and revoke credentials the other still hands out. The error
/// is reported on the later credential and names the earlier one and its line.
///
/// Only hashes of the targets are kept for the whole inventory: at 100,000 credentials the
/// target strings themselves (a file store has three) cost tens of MiB of peak memory at load.
/// Equal hashes are confirmed by comparing the strings, so a collision never reports a clash.
pub(super) fn shared_targets(file: &Path, credentials: &[CredentialSpec]) -> Vec<ConfigError> {
    const PARTS: [&str; 2] = ["rotator", "store"];
    let targets = |c: &CredentialSpec, part: usize| match part {
        0 => c.rotator.targets(),
        _ => c.store.targets(),
    };
    let hasher = std::hash::RandomState::new();
    // (hash, credential, part, position among the part's targets)
    let mut seen: Vec<(u64, usize, usize, usize)> = Vec::with_capacity(credentials.len());
    for (i, c) in credentials.iter().enumerate() {
        for part in 0..PARTS.len() {
            seen.extend(
                targets(c, part)
                    .iter()
                    .enumerate()
                    .map(|(k, t)| (hasher.hash_one(t), i, part, k)),
            );
        }
    }
    seen.sort_unstable();
    let target_of = |(_, i, part, k): (u64, usize, usize, usize)| {
        targets(&credentials[i], part).into_iter().nth(k)
    };
    // Each later credential's first clash (in the order of its own targets), in inventory order.
    let mut clashes: BTreeMap<usize, ((usize, usize), String, usize)> = BTreeMap::new();
    for run in seen.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
        for (k, &later) in run.iter().enumerate().skip(1) {
            let Some(target) = target_of(later) else {
                continue;
            };
            let first = run[..k].iter().find(|&&earlier| {
                earlier.1 != later.1 && target_of(earlier) == Some(target.clone())
            });
            if let Some(&(_, first, _, _)) = first {
                let clash = ((later.2, later.3), target, first);
                match clashes.entry(later.1) {
                    Entry::Occupied(mut o) if o.get().0 > clash.0 => {
                        o.insert(clash);
                    }
                    Entry::Occupied(_) => {}
                    Entry::Vacant(v) => {
                        v.insert(clash);
                    }
                }
            }
        }
    }
    clashes
        .into_iter()
        .map(|(i, ((part, _), target, first))| {
            let (c, first) = (&credentials[i], &credentials[first]);
            ConfigError {
                file: file.to_owned(),
                line: c.place.0,
                column: c.place.1,
                field: format!("credential[{}].{}", c.id, PARTS[part]),
                message: format!(
                    "{target} is also written by credential `{}` (line {}): two credentials \
                     must not share a location",
                    first.id, first.place.0
                ),
            }
        })
        .collect()
}
