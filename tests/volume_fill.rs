//! `volume create --preallocate` allocates every block with encrypted zeroes (the file is no
//! longer sparse, the volume still reads as zeroes and holds what is written), and
//! `volume delete --wipe` overwrites the data area with random bytes before shredding the key.
//! Progress bars stay off when stderr is not a terminal (no control characters in logs).
//! Peer: qemu-io.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::*;

const DATA_OFFSET: usize = 1 << 20;

fn cli(state: &std::path::Path) -> Command {
    nbdcrypt_cli(state)
}

fn ok(c: &mut Command) -> (String, String) {
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "control characters on a non-terminal: {stderr:?}"
    );
    (stdout, stderr)
}

#[test]
fn preallocate_fills_with_ciphertext_and_reads_as_zeroes() {
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("prealloc");
    let state = dir.path("state");
    ok(cli(&state).args(["volume", "create", "sparse", "--size", "16M"]));
    ok(cli(&state).args(["volume", "create", "full", "--size", "16M", "--preallocate"]));
    let sparse = std::fs::metadata(state.join("volumes/sparse.img")).unwrap();
    let full = std::fs::metadata(state.join("volumes/full.img")).unwrap();
    assert!(sparse.blocks() * 512 < 4 << 20, "a fresh volume is sparse");
    assert!(
        full.blocks() * 512 >= 17 << 20,
        "preallocated: every block allocated"
    );
    let raw = std::fs::read(state.join("volumes/full.img")).unwrap();
    let data = &raw[DATA_OFFSET..];
    // Ciphertext of zeroes: no all-zero 4 KiB sector anywhere, and not a repeating pattern.
    assert!(data.chunks(4096).all(|s| s.iter().any(|&b| b != 0)));
    assert_ne!(&data[..4096], &data[4096..8192]);
    let server = Server::try_start(
        &dir,
        &[],
        &["--volume", "full"],
        &[("NBDCRYPT_STATE_DIR", state.to_str().unwrap())],
    )
    .unwrap();
    let out = run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read -P 0 0 16M",
                "-c",
                "write -P 0x3c 1M 64k",
            ])
            .args(["-c", "read -P 0x3c 1M 64k"])
            .arg(server.uri("full")),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn delete_wipe_overwrites_the_data_area_before_shredding() {
    let dir = TempDir::new("wipe");
    let state = dir.path("state");
    ok(cli(&state).args(["volume", "create", "w", "--size", "8M", "--preallocate"]));
    let img = state.join("volumes/w.img");
    let before = std::fs::read(&img).unwrap();
    let (out, _) = ok(cli(&state).args(["volume", "delete", "w", "--wipe", "--keep-ciphertext"]));
    assert!(out.contains("deleted volume w"), "{out}");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(before.len(), after.len());
    // Every 4 KiB of the data area changed (a random overwrite, not zeroes), and the header
    // no longer holds the wrapped key (crypto-shredding as usual).
    for (b, a) in before[DATA_OFFSET..]
        .chunks(4096)
        .zip(after[DATA_OFFSET..].chunks(4096))
    {
        assert_ne!(b, a);
        assert!(a.iter().any(|&x| x != 0));
    }
    let (desc, _) = ok(cli(&state).args(["volume", "describe", "w", "--json"]));
    assert!(desc.contains("\"state\": \"deleted\""), "{desc}");
}

#[test]
fn preallocate_draws_a_progress_bar_on_a_terminal() {
    // util-linux `script` gives the command a pseudo-terminal.
    if !peer_available("script (util-linux)", have("script")) {
        return;
    }
    let dir = TempDir::new("progress");
    let cmd = format!(
        "{} --log warn volume create p --size 64M --preallocate",
        env!("CARGO_BIN_EXE_nbdcrypt")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("NBDCRYPT_STATE_DIR", dir.path("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("preallocating ["), "{text}");
    assert!(text.contains("64.00 MiB"), "{text}");
}
