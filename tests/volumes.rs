//! Named-volume lifecycles through the CLI, against a temporary state directory and the local
//! KMS: scratch create → serve → write → restart → same data → delete → serve refused; a
//! persistent volume on a customer-managed key that is disabled, re-enabled, rotated and
//! scheduled for deletion; header corruption; the audit trail (one Decrypt per serve).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Rng, Server, TempDir, run_ok, seed};
use nbdcrypt::kms::local::LocalKms;
use nbdcrypt::kms::{Caller, Origin};
use nbdcrypt::volume::header::{HEADER_COPY_BYTES, Header};
use nbdcrypt::volume::manager::read_header;

fn cli(state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env("NBDCRYPT_STATE_DIR", state)
        .env_remove("NBDCRYPT_LOG");
    c
}

fn serve(dir: &TempDir, state: &std::path::Path, volumes: &[&str]) -> Result<Server, String> {
    let mut args = Vec::new();
    for v in volumes {
        args.push("--volume");
        args.push(v);
    }
    Server::try_start(
        dir,
        &[],
        &args,
        &[("NBDCRYPT_STATE_DIR", state.to_str().unwrap())],
    )
}

fn qemu_io(server: &Server, volume: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run_ok(c.arg(server.uri(volume)));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

fn decrypts_for(state: &std::path::Path, volume: &str) -> usize {
    LocalKms::open(state)
        .audit()
        .read_all()
        .unwrap()
        .iter()
        .filter(|r| {
            r.operation == "Decrypt" && r.volume.as_deref() == Some(volume) && r.purpose.is_none()
        })
        .count()
}

fn files_under(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn scratch_lifecycle_create_serve_restart_delete() {
    if !common::peer_available("qemu-io", common::have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("scratch-life");
    let state = dir.path("state");
    run_ok(cli(&state).args(["volume", "create", "job1", "--size", "32M"]));
    let describe = run_ok(cli(&state).args(["volume", "describe", "job1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&describe).unwrap();
    assert_eq!(v["type"], "scratch");
    assert!(
        v.get("kms_key").is_none(),
        "a scratch volume must never show its key: {describe}"
    );

    let server = serve(&dir, &state, &["job1"]).unwrap();
    qemu_io(&server, "job1", &["write -P 0x3c 1M 2M"]);
    drop(server.stop());
    let server = serve(&dir, &state, &["job1"]).unwrap();
    qemu_io(&server, "job1", &["read -P 0x3c 1M 2M", "read -P 0 0 1M"]);
    drop(server.stop());
    assert_eq!(
        decrypts_for(&state, "job1"),
        2,
        "exactly one Decrypt per serve"
    );

    let backing = state.join("volumes/job1.img");
    let blob = read_header(&backing, "job1").unwrap().header.wrapped_key;
    assert!(blob.len() > 60);
    let out = run_ok(cli(&state).args(["volume", "delete", "job1"]));
    assert!(out.contains("key is destroyed"), "{out}");
    let err = serve(&dir, &state, &["job1"])
        .err()
        .expect("a deleted volume must not serve");
    assert!(err.contains("was deleted"), "{err}");
    for f in files_under(&state) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == &blob[8..40]),
            "{} holds a copy of the wrapped key",
            f.display()
        );
    }
    assert!(!backing.exists(), "the backing file is removed by default");
}

#[test]
fn persistent_volume_follows_its_customer_key_state() {
    if !common::peer_available("qemu-io", common::have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("persistent-life");
    let state = dir.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let kms = LocalKms::open(&state);
    let me = Caller::local_admin();
    let cmk = kms
        .create_key(
            "team key",
            Some("alias/team"),
            &Default::default(),
            Origin::AwsKms,
            &me,
        )
        .unwrap();
    run_ok(cli(&state).args([
        "volume",
        "create",
        "db",
        "--size",
        "16M",
        "--type",
        "persistent",
        "--kms-key",
        "alias/team",
    ]));
    let describe = run_ok(cli(&state).args(["volume", "describe", "db", "--json"]));
    assert!(
        describe.contains(&cmk.arn),
        "persistent volumes show their key: {describe}"
    );

    let server = serve(&dir, &state, &["db"]).unwrap();
    qemu_io(&server, "db", &["write -P 0x5d 0 1M"]);
    drop(server.stop());

    kms.disable_key("alias/team", &me).unwrap();
    let err = serve(&dir, &state, &["db"])
        .err()
        .expect("disabled key must stop the serve");
    assert!(
        err.contains("DisabledException") && err.contains(&cmk.arn),
        "{err}"
    );
    kms.enable_key("alias/team", &me).unwrap();
    let server = serve(&dir, &state, &["db"]).unwrap();
    qemu_io(&server, "db", &["read -P 0x5d 0 1M"]);
    drop(server.stop());

    // Revoke the serving grant: AccessDeniedException; a new grant restores service.
    let grants = kms.list_grants("alias/team", &me).unwrap();
    assert_eq!(
        grants.len(),
        1,
        "volume create grants the serving principal"
    );
    let service = Caller::local_service();
    assert_eq!(grants[0].grantee, service.principal);
    let out = run_ok(cli(&state).args(["kms", "revoke-grant", "alias/team", &grants[0].grant_id]));
    assert!(out.contains("revoked"), "{out}");
    let err = serve(&dir, &state, &["db"])
        .err()
        .expect("revoked grant must stop the serve");
    assert!(
        err.contains("AccessDeniedException")
            && err.contains("is not authorized to perform: kms:Decrypt"),
        "{err}"
    );
    let header = read_header(&state.join("volumes/db.img"), "db")
        .unwrap()
        .header;
    let uuid = header
        .context
        .iter()
        .find(|(k, _)| k == "nbdcrypt:volume-id")
        .unwrap()
        .1
        .clone();
    run_ok(
        cli(&state)
            .args([
                "kms",
                "create-grant",
                "alias/team",
                "--grantee",
                &service.principal,
                "--operation",
                "Decrypt",
            ])
            .arg("--context-subset")
            .arg(format!("nbdcrypt:volume-id={uuid}")),
    );
    let server = serve(&dir, &state, &["db"]).unwrap();
    qemu_io(&server, "db", &["read -P 0x5d 0 1M"]);
    drop(server.stop());

    // A Deny in the key policy wins over the grant.
    let policy = dir.path("deny.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"Version":"2012-10-17","Statement":[
            {{"Effect":"Allow","Principal":{{"AWS":"{}"}},"Action":"kms:*","Resource":"*"}},
            {{"Sid":"NoServing","Effect":"Deny","Principal":{{"AWS":"{}"}},"Action":"kms:Decrypt","Resource":"*"}}]}}"#,
            me.principal, service.principal
        ),
    )
    .unwrap();
    run_ok(
        cli(&state)
            .args(["kms", "put-key-policy", "alias/team", "--policy-file"])
            .arg(&policy),
    );
    let err = serve(&dir, &state, &["db"])
        .err()
        .expect("a Deny must stop the serve");
    assert!(err.contains("explicit deny"), "{err}");
    std::fs::write(
        &policy,
        format!(r#"{{"Statement":{{"Effect":"Allow","Principal":{{"AWS":"{}"}},"Action":"kms:*","Resource":"*"}}}}"#, me.principal),
    )
    .unwrap();
    run_ok(
        cli(&state)
            .args(["kms", "put-key-policy", "alias/team", "--policy-file"])
            .arg(&policy),
    );

    kms.rotate_key_on_demand("alias/team", &me).unwrap();
    let server = serve(&dir, &state, &["db"]).unwrap();
    qemu_io(&server, "db", &["read -P 0x5d 0 1M"]);
    drop(server.stop());

    kms.schedule_key_deletion("alias/team", 7, &me).unwrap();
    let err = serve(&dir, &state, &["db"])
        .err()
        .expect("pending deletion must stop the serve");
    assert!(
        err.contains("KMSInvalidStateException") && err.contains("PendingDeletion"),
        "{err}"
    );
    kms.cancel_key_deletion("alias/team", &me).unwrap();
    kms.enable_key("alias/team", &me).unwrap();
    let server = serve(&dir, &state, &["db"]).unwrap();
    qemu_io(&server, "db", &["read -P 0x5d 0 1M"]);
    drop(server.stop());

    let records = kms.audit().read_all().unwrap();
    for (op, code) in [
        ("Decrypt", Some("DisabledException")),
        ("Decrypt", Some("KMSInvalidStateException")),
        ("DisableKey", None),
        ("RotateKeyOnDemand", None),
    ] {
        assert!(
            records
                .iter()
                .any(|r| r.operation == op && r.error_code.as_deref() == code),
            "audit lacks {op} {code:?}"
        );
    }
    // Serves: 5 successful + 4 refused, one Decrypt each.
    assert_eq!(decrypts_for(&state, "db"), 9);
}

#[test]
fn header_damage_is_survived_once_and_refused_twice() {
    let dir = TempDir::new("header-damage");
    let state = dir.path("state");
    let mut rng = Rng::new(seed("header damage"));
    run_ok(cli(&state).args(["volume", "create", "h", "--size", "8M"]));
    let backing = state.join("volumes/h.img");
    let flip = |offset: usize| {
        let mut b = std::fs::read(&backing).unwrap();
        b[offset] ^= 0x40;
        std::fs::write(&backing, b).unwrap();
    };
    // One damaged copy: still serves, and taking the lease rewrites (heals) the damaged copy.
    flip(100 + usize::try_from(rng.below(50)).unwrap());
    let server = serve(&dir, &state, &["h"]).unwrap();
    drop(server.stop());
    let healed = read_header(&backing, "h").unwrap();
    assert!(healed.damaged.is_none(), "{:?}", healed.damaged);
    // Both damaged: a clear refusal.
    flip(100);
    flip(HEADER_COPY_BYTES + 100);
    let err = serve(&dir, &state, &["h"])
        .err()
        .expect("both copies damaged must not serve");
    assert!(err.contains("both header copies are unusable"), "{err}");
}

#[test]
fn wrong_key_check_is_refused_not_served() {
    let dir = TempDir::new("wrong-key");
    let state = dir.path("state");
    run_ok(cli(&state).args(["volume", "create", "w", "--size", "8M"]));
    let backing = state.join("volumes/w.img");
    let loaded = read_header(&backing, "w").unwrap();
    let mut h: Header = loaded.header;
    h.key_check[0] ^= 1;
    h.sequence += 1;
    let bytes = h.encode().unwrap();
    let mut file = std::fs::read(&backing).unwrap();
    for slot in 0..2 {
        file[slot * HEADER_COPY_BYTES..(slot + 1) * HEADER_COPY_BYTES].copy_from_slice(&bytes);
    }
    std::fs::write(&backing, file).unwrap();
    let err = serve(&dir, &state, &["w"])
        .err()
        .expect("a key that fails its check must not serve");
    assert!(
        err.contains("does not match the volume's key-check value"),
        "{err}"
    );
}

#[test]
fn kms_cli_rewrap_and_export_key_for_recovery() {
    if !common::peer_available("qemu-io", common::have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("rewrap");
    let state = dir.path("state");
    let out = run_ok(cli(&state).args([
        "kms",
        "create-key",
        "--alias",
        "alias/a",
        "--description",
        "first",
    ]));
    let arn_a = out.lines().nth(1).unwrap().to_owned();
    let out = run_ok(cli(&state).args(["kms", "create-key", "--alias", "alias/b"]));
    let arn_b = out.lines().nth(1).unwrap().to_owned();
    let refused = cli(&state)
        .args(["kms", "create-key", "--key-spec", "RSA_2048"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("symmetric keys only"));

    run_ok(cli(&state).args([
        "volume",
        "create",
        "p",
        "--size",
        "8M",
        "--type",
        "persistent",
        "--kms-key",
        "alias/a",
    ]));
    let server = serve(&dir, &state, &["p"]).unwrap();
    qemu_io(&server, "p", &["write -P 0x21 4096 8192"]);
    drop(server.stop());

    let out = run_ok(cli(&state).args(["volume", "rewrap", "p", "--kms-key", "alias/b"]));
    assert!(out.contains(&arn_b), "{out}");
    let describe = run_ok(cli(&state).args(["volume", "describe", "p", "--json"]));
    assert!(
        describe.contains(&arn_b) && !describe.contains(&arn_a),
        "{describe}"
    );
    // The old key can go away entirely: the volume no longer depends on it.
    run_ok(cli(&state).args(["kms", "disable-key", "alias/a"]));
    let server = serve(&dir, &state, &["p"]).unwrap();
    qemu_io(&server, "p", &["read -P 0x21 4096 8192"]);
    drop(server.stop());

    // export-key: refused without --confirm and for scratch volumes; otherwise 128 hex digits
    // that decrypt the data area independently (Python cryptography).
    assert!(
        !cli(&state)
            .args(["volume", "export-key", "p"])
            .output()
            .unwrap()
            .status
            .success()
    );
    run_ok(cli(&state).args(["volume", "create", "s", "--size", "8M"]));
    let scratch = cli(&state)
        .args(["volume", "export-key", "s", "--confirm"])
        .output()
        .unwrap();
    assert!(!scratch.status.success());
    assert!(String::from_utf8_lossy(&scratch.stderr).contains("never shown"));
    let key = run_ok(cli(&state).args(["volume", "export-key", "p", "--confirm"]));
    let key = key.trim();
    assert_eq!(key.len(), 128);
    let plain = common::volumes::oracle_decrypt(
        &state.join("volumes/p.img"),
        key,
        4096,
        1 << 20,
        4096,
        8192,
    );
    assert!(
        plain.iter().all(|&b| b == 0x21),
        "the exported key does not decrypt the volume"
    );
    let audit = run_ok(cli(&state).args(["kms", "audit", "--operation", "ReEncrypt", "--json"]));
    assert_eq!(audit.lines().count(), 1, "{audit}");
}
