//! What a provider needs to be allowed to do, for `keyrotd policy`: the least privilege of the
//! identity keyrotd runs as, scoped to the resources one credential touches.
//!
//! Each provider states its needs next to the code that makes the calls
//! ([`Rotator::permissions`](crate::Rotator::permissions),
//! [`Store::permissions`](crate::Store::permissions)), so the two cannot drift apart. A need is an
//! AWS policy statement, SQL a database administrator runs, or a sentence for what no policy
//! language states (a directory's write access).

use serde::Serialize;

/// Everything one rotator or store needs, in the order it should be shown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    /// The needs themselves.
    pub needs: Vec<Permission>,
    /// Caveats about the needs: a placeholder or wildcard the configuration could not fill in, a
    /// need that depends on how the resource was set up (a customer-managed KMS key).
    pub notes: Vec<String>,
}

impl Permissions {
    /// No need at all: the default of providers that call nothing (the `random` rotator).
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a need.
    pub fn need(mut self, need: Permission) -> Self {
        self.needs.push(need);
        self
    }

    /// Adds a caveat.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// Appends every need and note of `other`.
    pub fn extend(&mut self, other: Permissions) {
        self.needs.extend(other.needs);
        self.notes.extend(other.notes);
    }
}

/// One need of a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// An `Allow` statement of an AWS IAM policy.
    Aws(AwsStatement),
    /// A SQL statement a database administrator runs for the role keyrotd logs in as.
    Sql(SqlGrant),
    /// A `path` rule of a Vault (OpenBao) policy for the token keyrotd logs in with.
    Vault(VaultRule),
    /// A need no policy language states, in words.
    Text(String),
}

/// An `Allow` statement of an AWS IAM policy: its actions on exactly its resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AwsStatement {
    /// The statement id (`Sid`): letters and digits only, as IAM requires.
    pub sid: String,
    /// The actions, each with the plugin methods that call it.
    pub actions: Vec<AwsAction>,
    /// The resource ARNs (IAM wildcards `*` and `?` allowed).
    pub resources: Vec<String>,
}

/// One AWS action (`iam:CreateAccessKey`) and the plugin methods that call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AwsAction {
    /// The action, `service:Operation`.
    pub action: &'static str,
    /// The [`Rotator`](crate::Rotator) or [`Store`](crate::Store) methods that call it (`issue`,
    /// `current`).
    pub used_by: &'static [&'static str],
}

/// A `path "..." { capabilities = [...] }` rule of a Vault policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VaultRule {
    /// The API path, without `/v1/` (`secret/data/app`; Vault's `*` and `+` globs allowed).
    pub path: String,
    /// The capabilities needed on it (`read`, `create`, `update`, `delete`, `list`, `sudo`).
    pub capabilities: Vec<&'static str>,
    /// The [`Rotator`](crate::Rotator) or [`Store`](crate::Store) methods that need it.
    pub used_by: Vec<&'static str>,
}

impl Permission {
    /// The need of `capabilities` on the Vault API path `path` (`secret/data/app`), for the
    /// plugin methods `used_by`.
    pub fn vault(path: String, capabilities: &[&'static str], used_by: &[&'static str]) -> Self {
        Self::Vault(VaultRule {
            path,
            capabilities: capabilities.to_vec(),
            used_by: used_by.to_vec(),
        })
    }
}

/// A SQL statement granting a database role what keyrotd's connection needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SqlGrant {
    /// The statement. The role keyrotd logs in as appears as the psql variable
    /// `:"admin_role"`, since its name is in a secret keyrotd does not read here.
    pub statement: String,
    /// The servers it applies to (`PostgreSQL 16 and newer`), or `None` for every version.
    pub versions: Option<&'static str>,
    /// Why it is needed, naming the plugin methods.
    pub why: String,
}

/// The AWS partition of a region (`aws`, `aws-cn`, `aws-us-gov`); `aws` when none is known.
pub fn aws_partition(region: Option<&str>) -> &'static str {
    match region {
        Some(r) if r.starts_with("cn-") => "aws-cn",
        Some(r) if r.starts_with("us-gov-") => "aws-us-gov",
        _ => "aws",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_the_region() {
        assert_eq!(aws_partition(Some("eu-west-1")), "aws");
        assert_eq!(aws_partition(Some("cn-north-1")), "aws-cn");
        assert_eq!(aws_partition(Some("us-gov-west-1")), "aws-us-gov");
        assert_eq!(aws_partition(None), "aws");
    }

    #[test]
    fn builds_in_order() {
        let mut p = Permissions::none().need(Permission::Text("a".into()));
        p.extend(
            Permissions::none()
                .need(Permission::Text("b".into()))
                .note("n"),
        );
        assert_eq!(
            p.needs,
            vec![Permission::Text("a".into()), Permission::Text("b".into())]
        );
        assert_eq!(p.notes, vec!["n".to_owned()]);
    }
}
