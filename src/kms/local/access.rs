//! Access control on the local KMS: key policies (evaluated by [`super::super::policy`]) and
//! grants, and the operations that manage them.

use super::super::store::{KeyRecord, State};
use super::super::{Caller, Cause, EncryptionContext, KeyManager, KeyState, KmsError};
use super::{ACCOUNT, ADMIN_PRINCIPAL, LocalKms, VIA_SERVICE, arn, new_uuid};

/// The policy in force for a key: its own, or the default for its manager.
fn effective_policy(k: &KeyRecord) -> String {
    k.policy.clone().unwrap_or_else(|| match k.manager {
        KeyManager::Aws => super::super::policy::default_managed_policy(ACCOUNT, VIA_SERVICE),
        KeyManager::Customer => {
            super::super::policy::default_customer_policy(ACCOUNT, ADMIN_PRINCIPAL)
        }
    })
}

impl LocalKms {
    /// Decides whether `caller` may perform `action` on key `id` (explicit Deny, then policy
    /// Allow, then grants), as AWS does. `context` is the request's encryption context.
    pub(super) fn authorize(
        state: &State,
        operation: &'static str,
        action: &str,
        id: &str,
        caller: &Caller,
        context: &EncryptionContext,
    ) -> Result<(), KmsError> {
        let k = state.keys.get(id).ok_or_else(|| KmsError::NotFound {
            operation,
            key: arn(id),
        })?;
        let text = effective_policy(k);
        let policy = super::super::policy::parse(&text).map_err(|e| KmsError::MalformedPolicy {
            operation,
            key: arn(id),
            cause: Cause::new(e),
        })?;
        let key_arn = arn(id);
        let facts = super::super::policy::RequestFacts {
            principal: &caller.principal,
            account: &caller.account,
            via_service: caller.via_service.as_deref(),
            action,
            resource: &key_arn,
            context: &context.0,
        };
        let denied = |reason: String| KmsError::AccessDenied {
            operation,
            key: key_arn.clone(),
            principal: caller.principal.clone(),
            reason,
        };
        match policy.evaluate(&facts) {
            super::super::policy::Decision::Allow => Ok(()),
            super::super::policy::Decision::ExplicitDeny(sid) => Err(denied(format!(
                "of an explicit deny in the key policy{}",
                sid.map(|s| format!(" (statement {s:?})"))
                    .unwrap_or_default()
            ))),
            super::super::policy::Decision::ImplicitDeny => {
                let granted = k.grants.iter().any(|g| {
                    g.grantee == caller.principal
                        && g.operations.iter().any(|o| o == action)
                        && g.context_subset
                            .iter()
                            .all(|(ck, cv)| context.0.get(ck) == Some(cv))
                        && (g.context_equals.is_empty() || g.context_equals == context.0)
                });
                if granted {
                    Ok(())
                } else {
                    Err(denied(format!(
                        "no key policy statement or grant allows the kms:{action} action"
                    )))
                }
            }
        }
    }

    pub(super) fn create_grant_impl(
        &self,
        key: &str,
        grantee: &str,
        operations: &[&str],
        context_subset: &EncryptionContext,
        caller: &Caller,
    ) -> Result<String, KmsError> {
        const OP: &str = "CreateGrant";
        const GRANTABLE: [&str; 7] = [
            "Decrypt",
            "Encrypt",
            "GenerateDataKey",
            "ReEncryptFrom",
            "ReEncryptTo",
            "DescribeKey",
            "RetireGrant",
        ];
        self.transact(OP, key, caller, None, |state, me| {
            let (id, c) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            if let Some(bad) = operations.iter().find(|o| !GRANTABLE.contains(o)) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("{bad} is not a grant operation"),
                });
            }
            let k = state.keys.get_mut(&id).ok_or_else(|| KmsError::NotFound {
                operation: OP,
                key: key.to_owned(),
            })?;
            if matches!(k.state, KeyState::PendingDeletion) {
                return Err(KmsError::InvalidState {
                    operation: OP,
                    key: arn(&id),
                    state: k.state.to_string(),
                });
            }
            let grant_id = new_uuid().replace('-', "");
            k.grants.push(super::super::store::Grant {
                grant_id: grant_id.clone(),
                name: String::new(),
                grantee: grantee.to_owned(),
                retiring_principal: Some(caller.principal.clone()),
                operations: operations.iter().map(|o| (*o).to_owned()).collect(),
                context_subset: context_subset.0.clone(),
                context_equals: Default::default(),
                created: me.clock.now(),
            });
            let _ = c;
            Ok((grant_id, true, arn(&id)))
        })
    }

    pub(super) fn remove_grant(
        &self,
        operation: &'static str,
        key: &str,
        grant_id: &str,
        caller: &Caller,
        revoke: bool,
    ) -> Result<(), KmsError> {
        self.transact(operation, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, operation, key)?;
            let k = state.keys.get(&id).ok_or_else(|| KmsError::NotFound {
                operation,
                key: key.to_owned(),
            })?;
            let g = k
                .grants
                .iter()
                .find(|g| g.grant_id == grant_id)
                .cloned()
                .ok_or_else(|| KmsError::NotFound {
                    operation,
                    key: format!("{} grant {grant_id}", arn(&id)),
                })?;
            let retiring = !revoke
                && (g.grantee == caller.principal
                    || g.retiring_principal.as_deref() == Some(caller.principal.as_str()));
            if !retiring {
                Self::authorize(
                    state,
                    operation,
                    operation,
                    &id,
                    caller,
                    &EncryptionContext::default(),
                )?;
            }
            if let Some(k) = state.keys.get_mut(&id) {
                k.grants.retain(|x| x.grant_id != grant_id);
            }
            Ok(((), true, arn(&id)))
        })
    }

    /// `RevokeGrant` (key administrators).
    pub fn revoke_grant(&self, key: &str, grant_id: &str, caller: &Caller) -> Result<(), KmsError> {
        self.remove_grant("RevokeGrant", key, grant_id, caller, true)
    }

    /// `ListGrants`.
    pub fn list_grants(
        &self,
        key: &str,
        caller: &Caller,
    ) -> Result<Vec<super::super::store::Grant>, KmsError> {
        const OP: &str = "ListGrants";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            Ok((state.keys[&id].grants.clone(), false, arn(&id)))
        })
    }

    /// `PutKeyPolicy`: refuses documents it does not fully understand.
    pub fn put_key_policy(&self, key: &str, policy: &str, caller: &Caller) -> Result<(), KmsError> {
        const OP: &str = "PutKeyPolicy";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            super::super::policy::parse(policy).map_err(|e| KmsError::MalformedPolicy {
                operation: OP,
                key: arn(&id),
                cause: Cause::new(e),
            })?;
            let k = state.keys.get_mut(&id).ok_or_else(|| KmsError::NotFound {
                operation: OP,
                key: key.to_owned(),
            })?;
            if k.manager == KeyManager::Aws {
                return Err(KmsError::AccessDenied {
                    operation: OP,
                    key: arn(&id),
                    principal: caller.principal.clone(),
                    reason: "the key is AWS managed and its policy cannot be changed".into(),
                });
            }
            k.policy = Some(policy.to_owned());
            Ok(((), true, arn(&id)))
        })
    }

    /// `GetKeyPolicy` (the default policy when none was put).
    pub fn get_key_policy(&self, key: &str, caller: &Caller) -> Result<String, KmsError> {
        const OP: &str = "GetKeyPolicy";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            let k = &state.keys[&id];
            let p = effective_policy(k);
            Ok((p, false, arn(&id)))
        })
    }
}
