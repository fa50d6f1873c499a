//! Grants and key policies on the local KMS.

use super::super::clock::Clock;
use super::super::{Caller, EncryptionContext, KeyService, Origin};
use super::{DEFAULT_ALIAS, KeySpec, LocalKms};

const T0: u64 = 1_800_000_000;

fn kms(tag: &str) -> (LocalKms, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("nbdcrypt-kms-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (LocalKms::with_clock(&dir, Clock::fixed(T0)), dir)
}

fn ctx() -> EncryptionContext {
    EncryptionContext::single("nbdcrypt:volume-id", "1234")
}

fn svc() -> Caller {
    Caller::local_service()
}

#[test]
fn grants_let_the_service_use_a_customer_key_and_revocation_denies_it() {
    let (k, dir) = kms("grants");
    let key = k
        .create_key(
            "cmk",
            Some("alias/cmk"),
            &KeySpec::default(),
            Origin::AwsKms,
            &Caller::local_admin(),
        )
        .unwrap();
    let e = k
        .generate_data_key("alias/cmk", 64, &ctx(), &svc())
        .unwrap_err();
    assert_eq!(e.code(), "AccessDeniedException");
    let msg = e.to_string();
    assert!(
        msg.contains(&svc().principal)
            && msg.contains("is not authorized to perform: kms:GenerateDataKey on resource: ")
            && msg.contains(&key.arn),
        "{msg}"
    );
    let grant = k
        .create_grant(
            &key.arn,
            &svc().principal,
            &["GenerateDataKey", "Decrypt"],
            &ctx(),
            &Caller::local_admin(),
        )
        .unwrap();
    let dk = k
        .generate_data_key("alias/cmk", 64, &ctx(), &svc())
        .unwrap();
    // The grant's context constraint: another volume's context is refused.
    let other = EncryptionContext::single("nbdcrypt:volume-id", "other");
    assert_eq!(
        k.generate_data_key("alias/cmk", 64, &other, &svc())
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );
    assert_eq!(
        k.list_grants(&key.arn, &Caller::local_admin())
            .unwrap()
            .len(),
        1
    );
    // The service cannot revoke (not an administrator), the administrator can.
    assert_eq!(
        k.revoke_grant(&key.arn, &grant, &svc()).unwrap_err().code(),
        "AccessDeniedException"
    );
    k.revoke_grant(&key.arn, &grant, &Caller::local_admin())
        .unwrap();
    assert_eq!(
        k.decrypt(&key.arn, &dk.blob, &ctx(), &svc())
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );
    // A new grant restores access; the grantee may retire it itself.
    let again = k
        .create_grant(
            &key.arn,
            &svc().principal,
            &["Decrypt"],
            &ctx(),
            &Caller::local_admin(),
        )
        .unwrap();
    assert!(k.decrypt(&key.arn, &dk.blob, &ctx(), &svc()).is_ok());
    k.retire_grant(&key.arn, &again, &svc()).unwrap();
    assert_eq!(
        k.decrypt(&key.arn, &dk.blob, &ctx(), &svc())
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn key_policy_deny_wins_and_malformed_policies_are_refused() {
    let (k, dir) = kms("policy");
    let admin = Caller::local_admin();
    let key = k
        .create_key("cmk", None, &KeySpec::default(), Origin::AwsKms, &admin)
        .unwrap();
    k.create_grant(
        &key.arn,
        &svc().principal,
        &["Decrypt", "GenerateDataKey"],
        &ctx(),
        &admin,
    )
    .unwrap();
    let dk = k.generate_data_key(&key.arn, 64, &ctx(), &svc()).unwrap();
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
        {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"{}"}},"Action":"kms:*","Resource":"*"}},
        {{"Sid":"NoServiceDecrypt","Effect":"Deny","Principal":{{"AWS":"{}"}},"Action":"kms:Decrypt","Resource":"*",
          "Condition":{{"StringEquals":{{"kms:EncryptionContext:nbdcrypt:volume-id":"1234"}}}}}}]}}"#,
        admin.principal,
        svc().principal
    );
    k.put_key_policy(&key.arn, &policy, &admin).unwrap();
    let e = k.decrypt(&key.arn, &dk.blob, &ctx(), &svc()).unwrap_err();
    assert_eq!(e.code(), "AccessDeniedException");
    assert!(e.to_string().contains("explicit deny"), "{e}");
    let bad = k
        .put_key_policy(&key.arn, r#"{"Statement":{"Effect":"Allow"}}"#, &admin)
        .unwrap_err();
    assert_eq!(bad.code(), "MalformedPolicyDocumentException");
    assert!(
        k.get_key_policy(&key.arn, &admin)
            .unwrap()
            .contains("NoServiceDecrypt")
    );
    // The managed default key's policy cannot be replaced.
    k.generate_data_key(DEFAULT_ALIAS, 64, &ctx(), &svc())
        .unwrap();
    assert_eq!(
        k.put_key_policy(DEFAULT_ALIAS, &policy, &admin)
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
