//! Key policies in the AWS JSON grammar, and their evaluation. Pure.
//!
//! Supported: `Version`, `Statement` (object or array) with `Sid`, `Effect` (`Allow`/`Deny`),
//! `Principal` (`"*"`, `{"AWS": ARN or [ARNs]}`), `Action` (string or array, `*`/`?` wildcards,
//! case-insensitive), `Resource` (`"*"` or the key ARN, wildcards), and `Condition` with the
//! operators `StringEquals`, `StringNotEquals`, `StringLike`, `StringNotLike` (and their
//! `StringEqualsIgnoreCase` form) over the keys `kms:ViaService`, `kms:CallerAccount` and
//! `kms:EncryptionContext:<key>`. Anything else is refused when the policy is stored
//! (`MalformedPolicyDocumentException`), so a policy is never half-understood.
//!
//! Evaluation follows AWS: an explicit `Deny` that matches wins; otherwise a matching `Allow`
//! allows; otherwise the request is implicitly denied.

use std::collections::BTreeMap;

use serde_json::Value;

/// One parsed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// `Sid`, if any.
    pub sid: Option<String>,
    /// `Allow` (true) or `Deny` (false).
    pub allow: bool,
    /// Principal ARNs, or `*`.
    pub principals: Vec<String>,
    /// Action patterns.
    pub actions: Vec<String>,
    /// Resource patterns.
    pub resources: Vec<String>,
    /// `(operator, condition key, values)`.
    pub conditions: Vec<(String, String, Vec<String>)>,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Statements in order.
    pub statements: Vec<Statement>,
}

/// What a request looks like to the policy.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    /// Caller principal ARN.
    pub principal: &'a str,
    /// Caller account.
    pub account: &'a str,
    /// `kms:ViaService`.
    pub via_service: Option<&'a str>,
    /// Action without prefix (e.g. `Decrypt`).
    pub action: &'a str,
    /// Key ARN.
    pub resource: &'a str,
    /// Encryption context of the request.
    pub context: &'a BTreeMap<String, String>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A `Deny` matched (its `Sid`, if any).
    ExplicitDeny(Option<String>),
    /// An `Allow` matched.
    Allow,
    /// Nothing matched.
    ImplicitDeny,
}

const OPERATORS: [&str; 5] = [
    "StringEquals",
    "StringNotEquals",
    "StringLike",
    "StringNotLike",
    "StringEqualsIgnoreCase",
];

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{what} must hold strings"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or a list of strings")),
    }
}

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not a policy this KMS can enforce.
    #[error("{0}")]
    Invalid(String),
}

/// Parses and validates a policy document.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let doc: Value = serde_json::from_str(text)?;
    statements(&doc).map_err(PolicyError::Invalid)
}

/// The statements of a parsed document, validated.
fn statements(doc: &Value) -> Result<Policy, String> {
    let stmts = match doc.get("Statement") {
        Some(Value::Array(a)) => a.clone(),
        Some(o @ Value::Object(_)) => vec![o.clone()],
        _ => return Err("the policy has no Statement".into()),
    };
    let mut statements = Vec::new();
    for s in &stmts {
        let obj = s.as_object().ok_or("a Statement must be an object")?;
        for k in obj.keys() {
            if ![
                "Sid",
                "Effect",
                "Principal",
                "Action",
                "Resource",
                "Condition",
            ]
            .contains(&k.as_str())
            {
                return Err(format!("unsupported statement element {k}"));
            }
        }
        let allow = match obj.get("Effect").and_then(Value::as_str) {
            Some("Allow") => true,
            Some("Deny") => false,
            _ => return Err("Effect must be Allow or Deny".into()),
        };
        let principals = match obj.get("Principal") {
            Some(Value::String(s)) if s == "*" => vec!["*".to_owned()],
            Some(Value::Object(p)) => {
                let mut out = Vec::new();
                for (k, v) in p {
                    if k != "AWS" {
                        return Err(format!("unsupported principal type {k}"));
                    }
                    out.extend(strings(v, "Principal.AWS")?);
                }
                out
            }
            _ => return Err("Principal must be \"*\" or {\"AWS\": ...}".into()),
        };
        let actions = strings(
            obj.get("Action").ok_or("a statement needs Action")?,
            "Action",
        )?;
        if let Some(bad) = actions
            .iter()
            .find(|a| !(*a == "*" || a.to_ascii_lowercase().starts_with("kms:")))
        {
            return Err(format!("action {bad} is not a kms: action"));
        }
        let resources = strings(
            obj.get("Resource").ok_or("a statement needs Resource")?,
            "Resource",
        )?;
        let mut conditions = Vec::new();
        if let Some(c) = obj.get("Condition") {
            let c = c.as_object().ok_or("Condition must be an object")?;
            for (op, body) in c {
                if !OPERATORS.contains(&op.as_str()) {
                    return Err(format!("unsupported condition operator {op}"));
                }
                let body = body
                    .as_object()
                    .ok_or("a condition operator needs an object")?;
                for (key, vals) in body {
                    let known = ["kms:ViaService", "kms:CallerAccount"].contains(&key.as_str())
                        || key.starts_with("kms:EncryptionContext:");
                    if !known {
                        return Err(format!("unsupported condition key {key}"));
                    }
                    conditions.push((op.clone(), key.clone(), strings(vals, key)?));
                }
            }
        }
        statements.push(Statement {
            sid: obj.get("Sid").and_then(Value::as_str).map(str::to_owned),
            allow,
            principals,
            actions,
            resources,
            conditions,
        });
    }
    Ok(Policy { statements })
}

/// `*` and `?` wildcard match.
pub fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = if ignore_case {
        (
            pattern.to_lowercase().chars().collect(),
            text.to_lowercase().chars().collect(),
        )
    } else {
        (pattern.chars().collect(), text.chars().collect())
    };
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn principal_matches(pattern: &str, facts: &RequestFacts<'_>) -> bool {
    if pattern == "*" || pattern == facts.principal {
        return true;
    }
    // The account root stands for every principal of the account (as AWS delegates to IAM).
    pattern == format!("arn:nbdcrypt:iam::{}:root", facts.account) || pattern == facts.account
}

fn condition_holds(op: &str, key: &str, values: &[String], facts: &RequestFacts<'_>) -> bool {
    let actual: Option<&str> = match key {
        "kms:ViaService" => facts.via_service,
        "kms:CallerAccount" => Some(facts.account),
        k => k
            .strip_prefix("kms:EncryptionContext:")
            .and_then(|ck| facts.context.get(ck).map(String::as_str)),
    };
    let Some(actual) = actual else {
        // A missing key never satisfies a positive condition; negated ones hold.
        return op.contains("Not");
    };
    let any = |f: &dyn Fn(&str) -> bool| values.iter().any(|v| f(v));
    match op {
        "StringEquals" => any(&|v| v == actual),
        "StringEqualsIgnoreCase" => any(&|v| v.eq_ignore_ascii_case(actual)),
        "StringNotEquals" => !any(&|v| v == actual),
        "StringLike" => any(&|v| glob(v, actual, false)),
        "StringNotLike" => !any(&|v| glob(v, actual, false)),
        _ => false,
    }
}

fn statement_matches(s: &Statement, facts: &RequestFacts<'_>) -> bool {
    let action = format!("kms:{}", facts.action);
    s.principals.iter().any(|p| principal_matches(p, facts))
        && s.actions.iter().any(|a| a == "*" || glob(a, &action, true))
        && s.resources
            .iter()
            .any(|r| r == "*" || glob(r, facts.resource, false))
        && s.conditions
            .iter()
            .all(|(op, k, v)| condition_holds(op, k, v, facts))
}

impl Policy {
    /// Evaluates the policy for a request.
    pub fn evaluate(&self, facts: &RequestFacts<'_>) -> Decision {
        if let Some(d) = self
            .statements
            .iter()
            .find(|s| !s.allow && statement_matches(s, facts))
        {
            return Decision::ExplicitDeny(d.sid.clone());
        }
        if self
            .statements
            .iter()
            .any(|s| s.allow && statement_matches(s, facts))
        {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }
}

/// The default policy of a customer-managed key: the key's account (its administrators) may do
/// everything; services such as nbdcrypt's serving role get access through grants.
pub fn default_customer_policy(account: &str, admin: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "Enable key administration for the account's administrator",
            "Effect": "Allow",
            "Principal": {"AWS": admin},
            "Action": "kms:*",
            "Resource": "*",
            "Condition": {"StringEquals": {"kms:CallerAccount": account}}
        }]
    })
    .to_string()
}

/// The policy of the service-managed default key: any principal of the account, but only
/// through the nbdcrypt service (`kms:ViaService`), as AWS-managed key policies do.
pub fn default_managed_policy(account: &str, via_service: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "Allow access through nbdcrypt for all principals in the account",
            "Effect": "Allow",
            "Principal": {"AWS": "*"},
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
            "Resource": "*",
            "Condition": {
                "StringEquals": {"kms:CallerAccount": account, "kms:ViaService": via_service}
            }
        }, {
            "Sid": "Allow the account to describe the key",
            "Effect": "Allow",
            "Principal": {"AWS": format!("arn:nbdcrypt:iam::{account}:root")},
            "Action": ["kms:Describe*", "kms:Get*", "kms:List*"],
            "Resource": "*"
        }]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        principal: &'a str,
        action: &'a str,
        ctx: &'a BTreeMap<String, String>,
    ) -> RequestFacts<'a> {
        RequestFacts {
            principal,
            account: "000000000000",
            via_service: Some("nbdcrypt.local"),
            action,
            resource: "arn:nbdcrypt:kms:local:000000000000:key/k",
            context: ctx,
        }
    }

    #[test]
    fn explicit_deny_wins_over_allow() {
        let p = parse(
            r#"{"Version":"2012-10-17","Statement":[
            {"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
            {"Sid":"NoDecrypt","Effect":"Deny","Principal":{"AWS":["arn:x:role/a"]},"Action":"kms:Decrypt","Resource":"*"}]}"#,
        )
        .unwrap();
        let ctx = BTreeMap::new();
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "Decrypt", &ctx)),
            Decision::ExplicitDeny(Some("NoDecrypt".into()))
        );
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "DescribeKey", &ctx)),
            Decision::Allow
        );
        assert_eq!(
            p.evaluate(&facts("arn:x:role/b", "Decrypt", &ctx)),
            Decision::Allow
        );
    }

    #[test]
    fn action_wildcards_and_conditions() {
        let p = parse(
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"arn:x:role/a"},"Action":["kms:GenerateDataKey*","kms:Re*"],
            "Resource":"*","Condition":{"StringLike":{"kms:EncryptionContext:nbdcrypt:volume":"db-*"},
            "StringEquals":{"kms:ViaService":"nbdcrypt.local"}}}}"#,
        )
        .unwrap();
        let mut ctx = BTreeMap::new();
        ctx.insert("nbdcrypt:volume".to_owned(), "db-1".to_owned());
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "GenerateDataKey", &ctx)),
            Decision::Allow
        );
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "ReEncryptFrom", &ctx)),
            Decision::Allow
        );
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "Decrypt", &ctx)),
            Decision::ImplicitDeny
        );
        ctx.insert("nbdcrypt:volume".to_owned(), "web".to_owned());
        assert_eq!(
            p.evaluate(&facts("arn:x:role/a", "GenerateDataKey", &ctx)),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn malformed_policies_are_refused() {
        for bad in [
            "not json",
            r#"{"Statement":[]} "#.trim_end(),
            r#"{"Statement":{"Effect":"Maybe","Principal":"*","Action":"kms:*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"s3:*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericLessThan":{"kms:CallerAccount":"1"}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"aws:SourceIp":"1"}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","NotAction":"x"}}"#,
        ] {
            let parsed = parse(bad);
            // An empty statement list is legal JSON but grants nothing; the rest must fail.
            if bad.contains("[]") {
                assert!(parsed.unwrap().statements.is_empty());
            } else {
                assert!(parsed.is_err(), "{bad}");
            }
        }
    }

    #[test]
    fn glob_matches_like_aws() {
        assert!(glob("kms:re*", "kms:ReEncryptFrom", true));
        assert!(glob("a?c", "abc", false));
        assert!(!glob("a?c", "abbc", false));
        assert!(glob("*", "", false));
        assert!(glob("db-*-x", "db-1-2-x", false));
    }
}
