//! `keyrotd policy [ID]`: the least privilege each credential's rotator and store need, scoped
//! to the resources they touch: an AWS IAM policy document, the PostgreSQL privileges of the
//! admin role as SQL, a Vault policy in HCL, and in words what no policy language states.
//!
//! The needs come from the providers themselves (`Rotator::permissions`, `Store::permissions`),
//! written beside their calls; this module only lays them out. It reads the inventory like
//! `check`, and neither the state database nor any secret.

use anyhow::Context;
use keyrotd_plugin::permissions::{AwsStatement, Permission, SqlGrant, VaultRule};
use keyrotd_plugin::Permissions;
use serde::Serialize;

use crate::config::{CredentialSpec, Inventory};

/// One credential's needs, as `policy --json` prints them.
#[derive(Debug, Serialize)]
struct CredentialPolicy {
    credential: String,
    rotator: &'static str,
    store: &'static str,
    /// The IAM policy document for the identity keyrotd runs as, when AWS is involved.
    aws_policy: Option<IamPolicy>,
    /// Each AWS action with the plugin and the methods that call it.
    aws_actions: Vec<ActionUse>,
    /// SQL for a database administrator.
    sql: Vec<SqlGrant>,
    /// The Vault policy (HCL) for keyrotd's token, when Vault is involved.
    vault_policy: Option<String>,
    /// Its rules, one per path, with the plugin methods that need them.
    vault_rules: Vec<VaultRule>,
    /// What no policy language states.
    requirements: Vec<String>,
    /// Placeholders and conditional needs.
    notes: Vec<String>,
}

/// An IAM policy document, its members in IAM's usual order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct IamPolicy {
    version: &'static str,
    statement: Vec<IamStatement>,
}

/// An `Allow` statement in IAM's own syntax.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct IamStatement {
    sid: String,
    effect: &'static str,
    action: Vec<&'static str>,
    resource: Vec<String>,
}

impl From<AwsStatement> for IamStatement {
    fn from(statement: AwsStatement) -> Self {
        Self {
            sid: statement.sid,
            effect: "Allow",
            action: statement.actions.iter().map(|a| a.action).collect(),
            resource: statement.resources,
        }
    }
}

/// An AWS action, the plugin (`rotator`, `store`) and its methods that call it.
#[derive(Debug, Serialize)]
struct ActionUse {
    action: &'static str,
    plugin: &'static str,
    used_by: &'static [&'static str],
}

/// `keyrotd policy [ID] [--json]`: prints the needs of every credential, or of `id` only (the
/// caller checked that it exists).
pub fn policy(inventory: &Inventory, id: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut policies = Vec::new();
    for spec in &inventory.credentials {
        if id.is_some_and(|id| id != spec.id) {
            continue;
        }
        policies.push(credential_policy(spec)?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&policies)?);
        return Ok(());
    }
    for (n, policy) in policies.iter().enumerate() {
        if n > 0 {
            println!();
        }
        print_text(policy)?;
    }
    Ok(())
}

fn credential_policy(spec: &CredentialSpec) -> anyhow::Result<CredentialPolicy> {
    let rotator = spec
        .rotator
        .build()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("credential `{}`: rotator", spec.id))?;
    let store = spec
        .store
        .build()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("credential `{}`: store", spec.id))?;
    let mut policy = CredentialPolicy {
        credential: spec.id.clone(),
        rotator: rotator.kind(),
        store: store.kind(),
        aws_policy: None,
        aws_actions: Vec::new(),
        sql: Vec::new(),
        vault_policy: None,
        vault_rules: Vec::new(),
        requirements: Vec::new(),
        notes: Vec::new(),
    };
    let mut statements = Vec::new();
    let mut needs = rotator.permissions();
    // The in-use check is made only for `revoke = "when_unused"`: its permission only then.
    if spec.revoke.when == crate::config::RevokeWhen::WhenUnused {
        needs.extend(rotator.use_permissions());
    }
    for (plugin, permissions) in [("rotator", needs), ("store", store.permissions())] {
        add(&mut policy, &mut statements, plugin, permissions);
    }
    if !policy.vault_rules.is_empty() {
        policy.vault_policy = Some(vault_hcl(&policy.vault_rules));
    }
    if !statements.is_empty() {
        policy.aws_policy = Some(IamPolicy {
            version: "2012-10-17",
            statement: statements,
        });
    }
    Ok(policy)
}

/// Files one plugin's needs under their kinds; notes said twice (an unset account) once.
fn add(
    policy: &mut CredentialPolicy,
    statements: &mut Vec<IamStatement>,
    plugin: &'static str,
    permissions: Permissions,
) {
    for need in permissions.needs {
        match need {
            Permission::Aws(statement) => {
                for action in &statement.actions {
                    policy.aws_actions.push(ActionUse {
                        action: action.action,
                        plugin,
                        used_by: action.used_by,
                    });
                }
                statements.push(statement.into());
            }
            Permission::Sql(grant) => policy.sql.push(grant),
            Permission::Vault(rule) => merge_vault_rule(&mut policy.vault_rules, rule),
            Permission::Text(text) => policy.requirements.push(text),
        }
    }
    for note in permissions.notes {
        if !policy.notes.contains(&note) {
            policy.notes.push(note);
        }
    }
}

/// Vault's capabilities in the order its documentation lists them.
const VAULT_CAPABILITIES: &[&str] = &[
    "create", "read", "update", "patch", "delete", "list", "sudo",
];

/// Adds `rule` to `rules`, one rule per path: a second need on the same path adds its
/// capabilities and methods.
fn merge_vault_rule(rules: &mut Vec<VaultRule>, rule: VaultRule) {
    let Some(same) = rules.iter_mut().find(|r| r.path == rule.path) else {
        rules.push(rule);
        return;
    };
    for capability in rule.capabilities {
        if !same.capabilities.contains(&capability) {
            same.capabilities.push(capability);
        }
    }
    same.capabilities.sort_by_key(|c| {
        VAULT_CAPABILITIES
            .iter()
            .position(|known| known == c)
            .unwrap_or(usize::MAX)
    });
    for method in rule.used_by {
        if !same.used_by.contains(&method) {
            same.used_by.push(method);
        }
    }
}

/// The rules as a Vault policy document.
fn vault_hcl(rules: &[VaultRule]) -> String {
    let mut hcl = String::new();
    for rule in rules {
        let capabilities: Vec<String> = rule
            .capabilities
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        hcl.push_str(&format!(
            "# {}\npath \"{}\" {{\n  capabilities = [{}]\n}}\n",
            rule.used_by.join(", "),
            rule.path,
            capabilities.join(", ")
        ));
    }
    hcl
}

fn print_text(policy: &CredentialPolicy) -> anyhow::Result<()> {
    println!(
        "# credential `{}`: rotator {}, store {}",
        policy.credential, policy.rotator, policy.store
    );
    if let Some(document) = &policy.aws_policy {
        println!("## AWS IAM policy for the identity keyrotd runs as");
        println!("{}", serde_json::to_string_pretty(document)?);
        println!("## Which calls need each action");
        for used in &policy.aws_actions {
            println!(
                "{}: {} {}",
                used.action,
                used.plugin,
                used.used_by.join(", ")
            );
        }
    }
    if !policy.sql.is_empty() {
        println!("## PostgreSQL: run as a superuser with psql -v admin_role=NAME");
        for grant in &policy.sql {
            match grant.versions {
                Some(versions) => println!("-- {versions} only: {}", grant.why),
                None => println!("-- {}", grant.why),
            }
            println!("{}", grant.statement);
        }
    }
    if let Some(hcl) = &policy.vault_policy {
        println!("## Vault (OpenBao) policy for keyrotd's token: bao policy write NAME FILE");
        print!("{hcl}");
    }
    if !policy.requirements.is_empty() {
        println!("## Also needed");
        for text in &policy.requirements {
            println!("- {text}");
        }
    }
    if policy.aws_policy.is_none()
        && policy.sql.is_empty()
        && policy.vault_policy.is_none()
        && policy.requirements.is_empty()
    {
        println!("## Nothing to grant: neither plugin calls a provider");
    }
    if !policy.notes.is_empty() {
        println!("## Notes");
        for note in &policy.notes {
            println!("- {note}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str, capabilities: &[&'static str], used_by: &[&'static str]) -> VaultRule {
        VaultRule {
            path: path.into(),
            capabilities: capabilities.to_vec(),
            used_by: used_by.to_vec(),
        }
    }

    #[test]
    fn vault_rules_merge_per_path_into_one_hcl_document() {
        let mut rules = Vec::new();
        merge_vault_rule(&mut rules, rule("secret/data/app", &["read"], &["current"]));
        merge_vault_rule(
            &mut rules,
            rule("secret/metadata/app", &["read"], &["stage"]),
        );
        merge_vault_rule(
            &mut rules,
            rule(
                "secret/data/app",
                &["update", "create", "read"],
                &["promote"],
            ),
        );
        assert_eq!(
            vault_hcl(&rules),
            "# current, promote\npath \"secret/data/app\" {\n  capabilities = [\"create\", \"read\", \"update\"]\n}\n\
             # stage\npath \"secret/metadata/app\" {\n  capabilities = [\"read\"]\n}\n"
        );
    }
}
