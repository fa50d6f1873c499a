use super::super::clock::{Clock, DAY};
use super::super::{Caller, EncryptionContext, KeyService, KeyState, KmsError, Origin};
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

/// The administrator acting through the nbdcrypt service: allowed by the default customer key
/// policy (administrator) and by the managed key's policy (via the service).
fn me() -> Caller {
    Caller {
        via_service: Some(super::VIA_SERVICE.into()),
        ..Caller::local_admin()
    }
}

#[test]
fn local_kms_wraps_and_unwraps_with_context() {
    let (k, dir) = kms("wrap");
    let dk = k
        .generate_data_key(DEFAULT_ALIAS, 64, &ctx(), &me())
        .unwrap();
    assert_eq!(dk.plaintext.len(), 64);
    let id = dk.key_arn.clone();
    let back = k.decrypt(&id, &dk.blob, &ctx(), &me()).unwrap();
    assert_eq!(*back, *dk.plaintext);
    // Wrong context: InvalidCiphertextException, naming the key.
    let e = k
        .decrypt(
            &id,
            &dk.blob,
            &EncryptionContext::single("nbdcrypt:volume-id", "9"),
            &me(),
        )
        .unwrap_err();
    assert_eq!(e.code(), "InvalidCiphertextException");
    assert!(e.to_string().contains(&id), "{e}");
    // A flipped blob byte.
    let mut bad = dk.blob.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert_eq!(
        k.decrypt(&id, &bad, &ctx(), &me()).unwrap_err().code(),
        "InvalidCiphertextException"
    );
    // Another key named: IncorrectKeyException.
    let other = k
        .create_key("other", None, &KeySpec::default(), Origin::AwsKms, &me())
        .unwrap();
    assert_eq!(
        k.decrypt(&other.arn, &dk.blob, &ctx(), &me())
            .unwrap_err()
            .code(),
        "IncorrectKeyException"
    );
    // No such key.
    assert_eq!(
        k.decrypt("alias/nope", &dk.blob, &ctx(), &me())
            .unwrap_err()
            .code(),
        "NotFoundException"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn local_kms_refuses_asymmetric_specs() {
    let (k, dir) = kms("spec");
    let e = k
        .create_key(
            "rsa",
            None,
            &KeySpec("RSA_2048".into()),
            Origin::AwsKms,
            &me(),
        )
        .unwrap_err();
    assert_eq!(e.code(), "ValidationException");
    assert!(e.to_string().contains("symmetric"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Puts a fresh customer key into `state`.
fn key_in(k: &LocalKms, state: KeyState) -> String {
    let origin = if state == KeyState::PendingImport {
        Origin::External
    } else {
        Origin::AwsKms
    };
    let md = k
        .create_key("matrix", None, &KeySpec::default(), origin, &me())
        .unwrap();
    match state {
        KeyState::Enabled | KeyState::PendingImport => {}
        KeyState::Disabled => {
            k.disable_key(&md.arn, &me()).unwrap();
        }
        KeyState::PendingDeletion => {
            k.schedule_key_deletion(&md.arn, 7, &me()).unwrap();
        }
    }
    md.arn
}

#[test]
fn key_state_matrix_matches_aws_error_names() {
    use KeyState::*;
    let (k, dir) = kms("matrix");
    // A blob wrapped while the key was enabled, for the Decrypt/ReEncrypt rows.
    let ok = "ok";
    let states = [Enabled, Disabled, PendingDeletion, PendingImport];
    type Op = fn(&LocalKms, &str, &[u8]) -> Result<(), KmsError>;
    let ops: [(&str, Op, [&str; 4]); 9] = [
        (
            "GenerateDataKey",
            |k, a, _| k.generate_data_key(a, 64, &ctx(), &me()).map(|_| ()),
            [
                ok,
                "DisabledException",
                "KMSInvalidStateException",
                "KMSInvalidStateException",
            ],
        ),
        (
            "Decrypt",
            |k, a, b| k.decrypt(a, b, &ctx(), &me()).map(|_| ()),
            [
                ok,
                "DisabledException",
                "KMSInvalidStateException",
                "KMSInvalidStateException",
            ],
        ),
        (
            "ReEncrypt",
            |k, a, b| k.re_encrypt(a, DEFAULT_ALIAS, b, &ctx(), &me()).map(|_| ()),
            [
                ok,
                "DisabledException",
                "KMSInvalidStateException",
                "KMSInvalidStateException",
            ],
        ),
        (
            "EnableKey",
            |k, a, _| k.enable_key(a, &me()).map(|_| ()),
            [
                ok,
                ok,
                "KMSInvalidStateException",
                "KMSInvalidStateException",
            ],
        ),
        (
            "DisableKey",
            |k, a, _| k.disable_key(a, &me()).map(|_| ()),
            [
                ok,
                ok,
                "KMSInvalidStateException",
                "KMSInvalidStateException",
            ],
        ),
        (
            "ScheduleKeyDeletion",
            |k, a, _| k.schedule_key_deletion(a, 30, &me()).map(|_| ()),
            [ok, ok, "KMSInvalidStateException", ok],
        ),
        (
            "CancelKeyDeletion",
            |k, a, _| k.cancel_key_deletion(a, &me()).map(|_| ()),
            [
                "KMSInvalidStateException",
                "KMSInvalidStateException",
                ok,
                "KMSInvalidStateException",
            ],
        ),
        (
            "RotateKeyOnDemand",
            |k, a, _| k.rotate_key_on_demand(a, &me()).map(|_| ()),
            [
                ok,
                "KMSInvalidStateException",
                "KMSInvalidStateException",
                "ValidationException",
            ],
        ),
        (
            "DescribeKey",
            |k, a, _| k.describe_key(a, &me()).map(|_| ()),
            [ok, ok, ok, ok],
        ),
    ];
    for (name, op, expected) in ops {
        for (state, want) in states.iter().zip(expected) {
            let key = key_in(&k, *state);
            // Wrap a blob under this key when it can (Enabled), else under a sibling that is
            // then put into the state: simplest is to wrap first and change state after.
            let blob = if *state == PendingImport {
                vec![0u8; 64]
            } else {
                let fresh = k
                    .create_key("blob", None, &KeySpec::default(), Origin::AwsKms, &me())
                    .unwrap();
                let dk = k.generate_data_key(&fresh.arn, 64, &ctx(), &me()).unwrap();
                match state {
                    Disabled => {
                        k.disable_key(&fresh.arn, &me()).unwrap();
                    }
                    PendingDeletion => {
                        k.schedule_key_deletion(&fresh.arn, 7, &me()).unwrap();
                    }
                    _ => {}
                }
                if matches!(name, "Decrypt" | "ReEncrypt") {
                    let got = op(&k, &fresh.arn, &dk.blob);
                    let code = got.as_ref().err().map_or(ok, |e| e.code());
                    assert_eq!(code, want, "{name} in {state}: {got:?}");
                    continue;
                }
                dk.blob
            };
            let got = op(&k, &key, &blob);
            let code = got.as_ref().err().map_or(ok, |e| e.code());
            // Decrypt/ReEncrypt of PendingImport: the blob cannot be one of its own.
            if matches!(name, "Decrypt" | "ReEncrypt") {
                assert!(
                    code == want || code == "InvalidCiphertextException",
                    "{name} in {state}: {got:?}"
                );
            } else {
                assert_eq!(code, want, "{name} in {state}: {got:?}");
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn deletion_window_destroys_the_key_and_its_blobs() {
    let (k, dir) = kms("delete");
    let key = k
        .create_key(
            "doomed",
            Some("alias/doomed"),
            &KeySpec::default(),
            Origin::AwsKms,
            &me(),
        )
        .unwrap();
    let dk = k
        .generate_data_key("alias/doomed", 64, &ctx(), &me())
        .unwrap();
    k.schedule_key_deletion("alias/doomed", 7, &me()).unwrap();
    k.clock().advance(6 * DAY);
    assert_eq!(
        k.decrypt(&key.arn, &dk.blob, &ctx(), &me())
            .unwrap_err()
            .code(),
        "KMSInvalidStateException"
    );
    k.cancel_key_deletion(&key.arn, &me()).unwrap();
    k.enable_key(&key.arn, &me()).unwrap();
    assert!(
        k.decrypt(&key.arn, &dk.blob, &ctx(), &me()).is_ok(),
        "cancelled in time"
    );
    k.schedule_key_deletion(&key.arn, 7, &me()).unwrap();
    k.clock().advance(7 * DAY);
    assert_eq!(
        k.decrypt(&key.arn, &dk.blob, &ctx(), &me())
            .unwrap_err()
            .code(),
        "NotFoundException"
    );
    assert_eq!(
        k.describe_key("alias/doomed", &me()).unwrap_err().code(),
        "NotFoundException"
    );
    let store = std::fs::read_to_string(dir.join("kms/keys.json")).unwrap();
    assert!(
        !store.contains(&key.key_id),
        "the destroyed key left a trace in the store"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rotation_yearly_and_on_demand_keeps_old_blobs_readable() {
    let (k, dir) = kms("rotate");
    let key = k
        .create_key("r", None, &KeySpec::default(), Origin::AwsKms, &me())
        .unwrap();
    k.enable_key_rotation(&key.arn, &me()).unwrap();
    let old = k.generate_data_key(&key.arn, 64, &ctx(), &me()).unwrap();
    k.clock().advance(366 * DAY);
    let newer = k.generate_data_key(&key.arn, 64, &ctx(), &me()).unwrap();
    let versions = k.list_key_rotations(&key.arn, &me()).unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[1].2, "automatic");
    k.rotate_key_on_demand(&key.arn, &me()).unwrap();
    assert_eq!(k.list_key_rotations(&key.arn, &me()).unwrap().len(), 3);
    for dk in [&old, &newer] {
        assert_eq!(
            *k.decrypt(&key.arn, &dk.blob, &ctx(), &me()).unwrap(),
            *dk.plaintext
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn imported_material_enables_the_key_and_does_not_rotate() {
    let (k, dir) = kms("import");
    let key = k
        .create_key("ext", None, &KeySpec::default(), Origin::External, &me())
        .unwrap();
    assert_eq!(key.state, KeyState::PendingImport);
    assert_eq!(
        k.import_key_material(&key.arn, &[1; 16], &me())
            .unwrap_err()
            .code(),
        "ValidationException"
    );
    k.import_key_material(&key.arn, &[7; 32], &me()).unwrap();
    let dk = k.generate_data_key(&key.arn, 64, &ctx(), &me()).unwrap();
    assert!(k.decrypt(&key.arn, &dk.blob, &ctx(), &me()).is_ok());
    assert_eq!(
        k.enable_key_rotation(&key.arn, &me()).unwrap_err().code(),
        "ValidationException"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn audit_log_records_every_call_and_no_key_material() {
    let (k, dir) = kms("audit");
    let dk = k
        .generate_data_key(DEFAULT_ALIAS, 64, &ctx(), &me())
        .unwrap();
    let _ = k.decrypt(&dk.key_arn, &dk.blob, &EncryptionContext::default(), &me());
    let records = k.audit().read_all().unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0].operation.as_str(), records[0].outcome.as_str()),
        ("GenerateDataKey", "success")
    );
    assert_eq!(
        records[1].error_code.as_deref(),
        Some("InvalidCiphertextException")
    );
    let log = std::fs::read(dir.join("audit.log")).unwrap();
    let hexkey: String = dk.plaintext.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!String::from_utf8_lossy(&log).contains(&hexkey[..16]));
    assert!(!log.windows(16).any(|w| w == &dk.plaintext[..16]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn store_with_loose_permissions_or_corruption_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (k, dir) = kms("perm");
    k.generate_data_key(DEFAULT_ALIAS, 64, &ctx(), &me())
        .unwrap();
    let file = dir.join("kms/keys.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = k.describe_key(DEFAULT_ALIAS, &me()).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&file, "{ not json").unwrap();
    let e = k.describe_key(DEFAULT_ALIAS, &me()).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    // The parser's error is kept as the source, not flattened into text.
    let KmsError::Unavailable { cause, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(cause.find::<serde_json::Error>().is_some(), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    // So is an I/O error, with its kind: the store is a directory.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = k.describe_key(DEFAULT_ALIAS, &me()).unwrap_err();
    let KmsError::Unavailable { cause, .. } = &e else {
        panic!("{e:?}")
    };
    let io = cause
        .find::<std::io::Error>()
        .expect("an io::Error in the chain");
    assert_eq!(io.raw_os_error(), Some(libc::EISDIR), "{e}");
    assert!(e.to_string().contains("cannot read"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}
