//! `volume reencrypt`: killed at each step of the job (and at a random moment), then run
//! again, it finishes; meanwhile `serve` refuses the volume and says how far it got. Afterwards
//! the data reads back identical, the raw backing file decrypts with the new exported key
//! (pyca/cryptography, not our code) and not with the old one, holes are still holes, both
//! header copies hold only the new key, and the audit log shows the operation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::volumes::{cli_err, cli_ok, create_on, oracle_decrypt, read_through, serve};
use common::{
    Rng, TempDir, have, nbdcrypt_cli, peer_available, raw_connect, raw_flush, raw_write, seed,
};
use nbdcrypt::volume::header::{HEADER_COPY_BYTES, Header};

/// The wrapped data key in each of the two header copies of `backing`.
fn wrapped_keys(backing: &Path) -> Vec<Vec<u8>> {
    let raw = std::fs::read(backing).unwrap();
    (0..2)
        .map(|i| {
            Header::decode(&raw[i * HEADER_COPY_BYTES..(i + 1) * HEADER_COPY_BYTES])
                .unwrap()
                .wrapped_key
        })
        .collect()
}

const MIB: usize = 1 << 20;

/// The data written: random bytes in [0, 20), [28, 30) and [36, 38) MiB; the rest never
/// written (holes).
fn fill(dir: &TempDir, state: &Path, name: &str, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; 40 * MIB];
    rng.fill(&mut data[..20 * MIB]);
    rng.fill(&mut data[28 * MIB..30 * MIB]);
    rng.fill(&mut data[36 * MIB..38 * MIB]);
    let server = serve(dir, state, &["--volume", name]).unwrap();
    let mut s = raw_connect(&server.addr, name);
    raw_write(&mut s, 1, 0, &data[..20 * MIB], 0);
    raw_write(&mut s, 2, 28 * MIB as u64, &data[28 * MIB..30 * MIB], 0);
    raw_write(&mut s, 3, 36 * MIB as u64, &data[36 * MIB..38 * MIB], 0);
    raw_flush(&mut s, 4);
    drop(s);
    server.stop();
    data
}

fn export_key(dir: &TempDir, state: &Path, name: &str, file: &str) -> String {
    let key = cli_ok(state, &["volume", "export-key", name, "--confirm"])
        .trim()
        .to_owned();
    // Where the secret audit finds it.
    std::fs::write(dir.path(file), &key).unwrap();
    key
}

/// `volume reencrypt` aborted at `point` (`NBDCRYPT_CRASH_AT`, like kill -9).
fn reencrypt_crashing_at(state: &Path, name: &str, point: &str) {
    let out = nbdcrypt_cli(state)
        .env("NBDCRYPT_CRASH_AT", point)
        .args(["volume", "reencrypt", name, "--json"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "reencrypt did not stop at {point}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_all(dir: &TempDir, state: &Path, name: &str) -> Vec<u8> {
    let server = serve(dir, state, &["--volume", name]).unwrap();
    let mut out = read_through(&server, name, u32::try_from(20 * MIB).unwrap());
    let mut s = raw_connect(&server.addr, name);
    out.extend(common::raw_read(
        &mut s,
        1,
        20 * MIB as u64,
        u32::try_from(20 * MIB).unwrap(),
    ));
    drop(s);
    server.stop();
    out
}

fn check_rekeyed(dir: &TempDir, state: &Path, name: &str, data: &[u8], old_key: &str) {
    let backing = dir.path(&format!("{name}.img"));
    assert!(
        read_all(dir, state, name) == data,
        "data changed by the re-encryption"
    );
    let new_key = export_key(dir, state, name, &format!("{name}-new.key"));
    assert_ne!(new_key, old_key, "the data key did not change");
    // The raw file decrypts with the new key (an oracle that is not our code) ...
    for (at, len) in [
        (0, MIB),
        (19 * MIB, MIB),
        (28 * MIB, 2 * MIB),
        (36 * MIB, 2 * MIB),
    ] {
        assert!(
            oracle_decrypt(&backing, &new_key, 4096, 1 << 20, at as u64, len) == data[at..at + len],
            "the backing file at {at} does not decrypt with the new key"
        );
        assert!(
            oracle_decrypt(&backing, old_key, 4096, 1 << 20, at as u64, len) != data[at..at + len],
            "the backing file at {at} still decrypts with the old key"
        );
    }
    // ... holes stayed holes (never-written ciphertext is still all zero, and unallocated) ...
    let raw = std::fs::read(&backing).unwrap();
    assert!(
        raw[(1 << 20) + 21 * MIB..(1 << 20) + 28 * MIB]
            .iter()
            .all(|&b| b == 0)
    );
    // ... and no header copy, nor the journal area, holds the old wrapped key.
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(state, &["volume", "describe", name, "--json"])).unwrap();
    assert_eq!(v["state"], "available", "{v}");
    assert!(
        raw[16 * 1024..1 << 20].iter().all(|&b| b == 0),
        "journal not cleared"
    );
}

#[test]
fn reencrypt_killed_at_each_step_then_resumed() {
    let dir = TempDir::new("reencrypt-steps");
    let state = dir.path("state");
    let mut rng = Rng::new(seed("reencrypt steps"));
    let backing = dir.path("r.img");
    let (ok, _, err) = create_on(&state, "r", "40M", &backing, &["--type", "persistent"]);
    assert!(ok, "{err}");
    let data = fill(&dir, &state, "r", &mut rng);
    let old_key = export_key(&dir, &state, "r", "r-old.key");
    let header_before = std::fs::read(&backing).unwrap()[..8192].to_vec();
    let old_wrapped = wrapped_keys(&backing);
    assert_eq!(old_wrapped[0], old_wrapped[1]);

    // Each run dies at a later step. Journal records are numbered from 1, one per 16 MiB
    // chunk (0..16, 16..32, 32..40 MiB). Record k is written once chunk k-1 is durable, and
    // chunk k is written while chunk k+1 is being transformed. A resumed run first repairs the
    // newest record's chunk, sector by sector, and goes on numbering.
    let points = [
        // The new key is in the header, nothing re-encrypted.
        ("reencrypt-after-header", None),
        // Chunk 16..32 MiB (data, holes, data) half written: 16..24 new, 24..32 old.
        ("reencrypt-mid-data:2", Some("16 MiB of 40 MiB")),
        // That chunk repaired, record 3 (32..40) written, nothing of it yet.
        ("reencrypt-after-record:3", Some("32 MiB of 40 MiB")),
        // Chunk 32..40 re-encrypted by the repair, then a crash right after its sync.
        ("reencrypt-after-data:3", Some("32 MiB of 40 MiB")),
        // Every chunk done, the header not switched yet.
        ("reencrypt-before-finish", Some("32 MiB of 40 MiB")),
    ];
    for (point, progress) in points {
        reencrypt_crashing_at(&state, "r", point);
        let refused = serve(&dir, &state, &["--volume", "r"])
            .err()
            .unwrap_or_else(|| {
                panic!("serve accepted the volume after a reencrypt died at {point}")
            });
        assert!(
            refused.contains("is being re-encrypted") && refused.contains("volume reencrypt r"),
            "{point}: {refused}"
        );
        if let Some(p) = progress {
            assert!(
                refused.contains(p),
                "{point}: expected {p:?} in:\n{refused}"
            );
        }
        let v: serde_json::Value =
            serde_json::from_str(&cli_ok(&state, &["volume", "describe", "r", "--json"])).unwrap();
        assert_eq!(v["state"], "reencrypting", "{point}: {v}");
    }
    let done = cli_ok(&state, &["volume", "reencrypt", "r", "--json"]);
    let last: serde_json::Value = serde_json::from_str(done.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{done}");
    assert!(last["resumed_at"].as_u64().is_some(), "{done}");
    check_rekeyed(&dir, &state, "r", &data, &old_key);
    assert_ne!(std::fs::read(&backing).unwrap()[..8192], header_before[..]);
    // The old wrapped key is gone from both header copies, and from the whole reserved area.
    let now = wrapped_keys(&backing);
    assert_eq!(now[0], now[1], "the two copies disagree");
    assert_ne!(now[0], old_wrapped[0]);
    let head = std::fs::read(&backing).unwrap()[..1 << 20].to_vec();
    assert!(
        !head
            .windows(old_wrapped[0].len())
            .any(|w| w == old_wrapped[0]),
        "the old wrapped key survives in the header area"
    );

    // The audit log: the operation's start and end, and its KMS calls with their purpose.
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let ops: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["purpose"] == "reencrypt")
        .collect();
    let has = |op: &str, outcome: &str| {
        ops.iter()
            .any(|r| r["operation"] == op && r["outcome"] == outcome)
    };
    assert!(has("nbdcrypt:ReencryptVolume", "started"), "{audit}");
    assert!(has("nbdcrypt:ReencryptVolume", "success"), "{audit}");
    assert!(has("GenerateDataKey", "success"), "{audit}");
    assert!(has("Decrypt", "success"), "{audit}");
}

/// A `kill -9` at a moment nobody chose, then the command again.
#[test]
fn reencrypt_killed_at_a_random_moment_then_resumed() {
    let dir = TempDir::new("reencrypt-kill");
    let state = dir.path("state");
    let mut rng = Rng::new(seed("reencrypt kill"));
    let backing = dir.path("k.img");
    let (ok, _, err) = create_on(&state, "k", "40M", &backing, &["--type", "persistent"]);
    assert!(ok, "{err}");
    let data = fill(&dir, &state, "k", &mut rng);
    let old_key = export_key(&dir, &state, "k", "k-old.key");
    // The portable backend makes the run slower, so that delays spread over it land inside.
    for delay_ms in [40u64, 120, 200, 280, 360] {
        let mut child = nbdcrypt_cli(&state)
            .args(["volume", "reencrypt", "k", "--json"])
            .env("NBDCRYPT_XTS_BACKEND", "portable")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms + rng.below(20)));
        let _ = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    let out = cli_ok(&state, &["volume", "reencrypt", "k", "--json"]);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(
        last["resumed_at"].as_u64().is_some(),
        "no kill landed inside a run (all before its first header update): {out}"
    );
    check_rekeyed(&dir, &state, "k", &data, &old_key);
}

#[test]
fn reencrypt_is_refused_while_served_and_a_torn_sector_is_not_papered_over() {
    let dir = TempDir::new("reencrypt-refusals");
    let state = dir.path("state");
    let mut rng = Rng::new(seed("reencrypt refusals"));
    let backing = dir.path("t.img");
    let (ok, _, err) = create_on(&state, "t", "16M", &backing, &[]);
    assert!(ok, "{err}");
    let mut data = vec![0u8; 16 * MIB];
    rng.fill(&mut data);
    {
        let server = serve(&dir, &state, &["--volume", "t"]).unwrap();
        common::volumes::write_through(&server, "t", &data);
        let err = cli_err(&state, &["volume", "reencrypt", "t"]);
        assert!(err.contains("being served by pid"), "{err}");
        server.stop();
    }
    // Die after the first chunk's record, then make one of its sectors torn: one 512-byte
    // unit rewritten (as a device that lost power in the middle of a 4 KiB write leaves it),
    // the other seven old. Resuming must refuse, not guess.
    reencrypt_crashing_at(&state, "t", "reencrypt-after-record:1");
    let mut raw = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    use std::io::{Seek, Write};
    raw.seek(std::io::SeekFrom::Start((1 << 20) + 4096 * 5 + 1024))
        .unwrap();
    raw.write_all(&rng.bytes(512)).unwrap();
    drop(raw);
    let err = cli_err(&state, &["volume", "reencrypt", "t"]);
    assert!(
        err.contains("sector 5 of the interrupted chunk is part old, part new ciphertext"),
        "{err}"
    );
}

#[test]
fn reencrypt_draws_a_progress_bar_on_a_terminal() {
    // util-linux `script` gives the command a pseudo-terminal.
    if !peer_available("script (util-linux)", have("script")) {
        return;
    }
    let dir = TempDir::new("reencrypt-bar");
    let state = dir.path("state");
    let (ok, _, err) = create_on(&state, "b", "64M", &dir.path("b.img"), &["--preallocate"]);
    assert!(ok, "{err}");
    let cmd = format!(
        "{} --log warn volume reencrypt b",
        env!("CARGO_BIN_EXE_nbdcrypt")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("NBDCRYPT_STATE_DIR", &state)
        .env("NBDCRYPT_XTS_BACKEND", "portable")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("re-encrypting ["), "{text}");
    assert!(text.contains("64.00 MiB"), "{text}");
    assert!(text.contains("re-encrypted under a new data key"), "{text}");
}
