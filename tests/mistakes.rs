//! Operator mistakes (issue 12) about creating and adopting volumes: each one is refused with
//! a message naming the problem and the way out, or does what the operator meant; and each
//! test checks that nothing was lost (the precious file's sha256, the other volume's data, the
//! registry agreeing with the disk). Mistakes while a volume is served: tests/mistakes_serving.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::volumes::*;
use common::{Rng, Server, TempDir, nbdcrypt_cli};

#[test]
fn create_refuses_a_backing_file_with_data_unless_forced() {
    let dir = TempDir::new("mist-precious");
    let state = dir.path("state");
    let precious = dir.path("precious.dat");
    std::fs::write(&precious, Rng::new(7).bytes(8 << 20)).unwrap();
    let before = sha256(&precious);
    let (ok, _, err) = create_on(&state, "bk", "64M", &precious, &[]);
    assert!(!ok);
    assert!(
        err.contains("already holds data") && err.contains("--force"),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(sha256(&precious), before, "the precious file changed");
    assert_eq!(std::fs::metadata(&precious).unwrap().len(), 8 << 20);
    assert!(
        listed(&state).is_empty(),
        "a refused create registered something"
    );

    // A file system signature is named.
    let fs = dir.path("fs.img");
    let mut img = vec![0u8; 4 << 20];
    img[0x438..0x43a].copy_from_slice(&[0x53, 0xef]);
    std::fs::write(&fs, &img).unwrap();
    let (ok, _, err) = create_on(&state, "fs", "16M", &fs, &[]);
    assert!(!ok);
    assert!(err.contains("ext2/ext3/ext4 file system"), "{err}");

    // An empty or all-zero file is fine; --force overwrites data knowingly.
    let zero = dir.path("zero.img");
    std::fs::File::create(&zero)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    assert!(create_on(&state, "z", "16M", &zero, &[]).0);
    assert!(create_on(&state, "bk", "16M", &precious, &["--force"]).0);
    assert_eq!(
        listed(&state),
        vec![
            ("bk".into(), "available".into()),
            ("z".into(), "available".into())
        ]
    );
}

#[test]
fn create_over_another_volumes_backing_is_refused_even_forced() {
    let dir = TempDir::new("mist-shared");
    let state = dir.path("state");
    cli_ok(&state, &["volume", "create", "s1", "--size", "16M"]);
    let s1 = state.join("volumes/s1.img");
    let server = serve(&dir, &state, &["--volume", "s1"]).unwrap();
    let data = Rng::new(3).bytes(1 << 20);
    write_through(&server, "s1", &data);
    drop(server);
    let before = sha256(&s1);
    // Through the path, a symlink to it, and with --force.
    let link = dir.path("link.img");
    std::os::unix::fs::symlink(&s1, &link).unwrap();
    for backing in [s1.to_str().unwrap(), link.to_str().unwrap()] {
        for force in [false, true] {
            let mut args = vec![
                "volume",
                "create",
                "bk4",
                "--size",
                "16M",
                "--backing",
                backing,
            ];
            if force {
                args.push("--force");
            }
            let err = cli_err(&state, &args);
            assert!(err.contains("is the backing store of volume s1"), "{err}");
        }
    }
    assert_eq!(sha256(&s1), before, "s1's backing store changed");
    assert_eq!(listed(&state), vec![("s1".into(), "available".into())]);
    let server = serve(&dir, &state, &["--volume", "s1"]).unwrap();
    assert_eq!(read_through(&server, "s1", 1 << 20), data);
}

#[test]
fn import_adopts_an_existing_volume_and_writes_nothing() {
    let dir = TempDir::new("mist-import");
    let state = dir.path("state");
    cli_ok(
        &state,
        &[
            "volume",
            "create",
            "v",
            "--size",
            "16M",
            "--type",
            "persistent",
        ],
    );
    let server = serve(&dir, &state, &["--volume", "v"]).unwrap();
    let data = Rng::new(5).bytes(65536);
    write_through(&server, "v", &data);
    drop(server);
    // The registry entry is lost; the volume is adopted again from its header.
    let img = dir.path("moved.img");
    std::fs::rename(state.join("volumes/v.img"), &img).unwrap();
    std::fs::remove_file(state.join("volumes/v.json")).unwrap();
    let before = sha256(&img);
    // create refuses it and points at import.
    let (ok, _, err) = create_on(&state, "v", "16M", &img, &[]);
    assert!(!ok);
    assert!(
        err.contains("nbdcrypt volume header") && err.contains("volume import"),
        "{err}"
    );
    let out = cli_ok(
        &state,
        &["volume", "import", "v", "--backing", img.to_str().unwrap()],
    );
    assert!(out.contains("imported persistent volume v"), "{out}");
    assert_eq!(sha256(&img), before, "import wrote to the store");
    // A second import of the same store, under any name, is refused.
    let err = cli_err(
        &state,
        &["volume", "import", "w", "--backing", img.to_str().unwrap()],
    );
    assert!(err.contains("already registered as volume v"), "{err}");
    let server = serve(&dir, &state, &["--volume", "v"]).unwrap();
    assert_eq!(read_through(&server, "v", 65536), data);
    drop(server);
    // Another state directory has another local KMS: the key cannot be unwrapped there, and
    // nothing is registered.
    let other = dir.path("other-state");
    let err = cli_err(
        &other,
        &["volume", "import", "v", "--backing", img.to_str().unwrap()],
    );
    assert!(err.contains("Decrypt"), "{err}");
    assert!(listed(&other).is_empty());
    // Not a volume at all.
    let junk = dir.path("junk.img");
    std::fs::write(&junk, vec![0u8; 2 << 20]).unwrap();
    let err = cli_err(
        &state,
        &["volume", "import", "j", "--backing", junk.to_str().unwrap()],
    );
    assert!(err.contains("holds no nbdcrypt volume"), "{err}");
}

#[test]
fn serve_refuses_a_truncated_backing_store_and_list_shows_it() {
    let dir = TempDir::new("mist-short");
    let state = dir.path("state");
    cli_ok(&state, &["volume", "create", "s2", "--size", "128M"]);
    let img = state.join("volumes/s2.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let log = serve(&dir, &state, &["--volume", "s2"])
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("is 64 MiB, volume needs 129 MiB"), "{log}");
    let list = cli_ok(&state, &["volume", "list"]);
    assert!(
        list.contains("damaged") && list.contains("backing store is 64 MiB, volume needs 129 MiB"),
        "{list}"
    );
    let desc = cli_ok(&state, &["volume", "describe", "s2"]);
    assert!(desc.contains("volume needs 129 MiB"), "{desc}");
    // Cut to 2 KiB: the first header copy still fits, and the store is named as too short.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2048)
        .unwrap();
    let log = serve(&dir, &state, &["--volume", "s2"])
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("is 2 KiB, volume needs 129 MiB"), "{log}");
}

fn create_with_crash(state: &Path, name: &str, point: &str, extra: &[&str]) {
    let mut args = vec!["volume", "create", name, "--size", "160M", "--preallocate"];
    args.extend_from_slice(extra);
    let out = nbdcrypt_cli(state)
        .args(&args)
        .env("NBDCRYPT_CRASH_AT", point)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{point}: create did not crash");
}

/// A creation killed at any point is either absent, or listed as incomplete, and then both
/// finished by `--resume` and removed by `delete`.
#[test]
fn create_killed_at_each_point_resumes_or_deletes_cleanly() {
    let dir = TempDir::new("mist-kill");
    let state = dir.path("state");
    let points = [
        "registered",
        "sized",
        "key-generated",
        "header-written",
        "preallocate-checkpoint",
    ];
    for (i, point) in points.iter().enumerate() {
        for finish in ["resume", "delete"] {
            let name = format!("k{i}-{finish}");
            create_with_crash(&state, &name, point, &[]);
            let img = state.join(format!("volumes/{name}.img"));
            let l = listed(&state);
            let st = l.iter().find(|(n, _)| *n == name).map(|(_, s)| s.clone());
            assert_eq!(st.as_deref(), Some("incomplete"), "{point}: {l:?}");
            let log = serve(&dir, &state, &["--volume", &name])
                .map(|_| ())
                .unwrap_err();
            assert!(
                log.contains("incomplete") && log.contains("--resume"),
                "{point}: {log}"
            );
            if finish == "resume" {
                let out = cli_ok(&state, &["volume", "create", &name, "--resume"]);
                assert!(out.contains("finished"), "{out}");
                let l = listed(&state);
                assert!(
                    l.contains(&(name.clone(), "available".into())),
                    "{point}: {l:?}"
                );
                let server = serve(&dir, &state, &["--volume", &name]).unwrap();
                let data = Rng::new(i as u64).bytes(4096);
                write_through(&server, &name, &data);
                assert_eq!(read_through(&server, &name, 4096), data);
                // Preallocated: every block of the data area is allocated.
                let blocks =
                    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).unwrap());
                assert!(blocks * 512 >= 160 << 20, "{point}: not preallocated");
                drop(server);
                cli_ok(&state, &["volume", "delete", &name]);
            } else {
                cli_ok(&state, &["volume", "delete", &name]);
                assert!(!img.exists(), "{point}: delete left the backing file");
                let l = listed(&state);
                assert!(
                    l.contains(&(name.clone(), "deleted".into())),
                    "{point}: {l:?}"
                );
            }
        }
    }
}

/// Ctrl-C (SIGINT) during preallocation stops at a checkpoint and says how to go on.
#[test]
fn ctrl_c_during_preallocation_leaves_a_resumable_volume() {
    let dir = TempDir::new("mist-ctrlc");
    let state = dir.path("state");
    let child = nbdcrypt_cli(&state)
        .args(["volume", "create", "big", "--size", "1G", "--preallocate"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until preallocation has started (the header exists).
    let img = state.join("volumes/big.img");
    assert!(
        within(Duration::from_secs(20), || {
            nbdcrypt::volume::manager::read_header(&img, "big").is_ok()
        })
        .is_some()
    );
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is incomplete") && err.contains("volume create big --resume"),
        "{err}"
    );
    let list = cli_ok(&state, &["volume", "list"]);
    assert!(list.contains("incomplete"), "{list}");
    cli_ok(&state, &["volume", "create", "big", "--resume"]);
    assert_eq!(listed(&state), vec![("big".into(), "available".into())]);
}

#[test]
fn failed_create_leaves_no_file_and_no_entry() {
    let dir = TempDir::new("mist-fail");
    let state = dir.path("state");
    let err = cli_err(&state, &["volume", "create", "big", "--size", "20T"]);
    assert!(err.contains("cannot size the backing file"), "{err}");
    let err = cli_err(
        &state,
        &[
            "volume",
            "create",
            "p",
            "--size",
            "16M",
            "--type",
            "persistent",
            "--kms-key",
            "alias/nope",
        ],
    );
    assert!(err.contains("NotFoundException"), "{err}");
    assert!(listed(&state).is_empty());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(state.join("volumes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn first_run_messages_are_clear() {
    let dir = TempDir::new("mist-firstrun");
    let state = dir.path("no-such-state");
    let out = cli_ok(&state, &["volume", "list"]);
    assert!(out.contains("does not exist"), "{out}");
    assert!(!state.exists(), "list created the state directory");
    // HOME unset: the password database's home, never the current directory.
    let out = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"))
        .args(["volume", "list"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let home = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .dir;
    assert!(!dir.path(".nbdcrypt").exists(), "{text}");
    if !home.join(".local/state/nbdcrypt").exists() {
        assert!(
            text.contains(&home.join(".local/state/nbdcrypt").display().to_string()),
            "{text}"
        );
    }
    let help = cli_ok(&state, &["info", "--help"]);
    assert!(help.contains("vaes"), "{help}");
    // Human units in text, raw numbers in JSON.
    let st = dir.path("state");
    cli_ok(&st, &["volume", "create", "a", "--size", "16M"]);
    let desc = cli_ok(&st, &["volume", "describe", "a"]);
    assert!(desc.contains("16 MiB (16777216 bytes)"), "{desc}");
    assert!(
        desc.lines()
            .any(|l| l.starts_with("created") && l.trim_end().ends_with('Z')),
        "{desc}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli_ok(&st, &["volume", "describe", "a", "--json"])).unwrap();
    assert_eq!(json["size"], 16 << 20);
    assert!(json["created"].is_u64());
    let audit = cli_ok(&st, &["kms", "audit"]);
    let first = audit.split_whitespace().next().unwrap_or_default();
    assert!(first.len() == 20 && first.ends_with('Z'), "{audit}");
    let list = cli_ok(&st, &["volume", "list"]);
    assert!(list.contains("16 MiB"), "{list}");
}

#[test]
fn serve_warnings_and_attach_hints() {
    let dir = TempDir::new("mist-hints");
    let state = dir.path("state");
    cli_ok(&state, &["volume", "create", "a", "--size", "16M"]);
    cli_ok(&state, &["volume", "create", "b", "--size", "16M"]);
    let server = serve(&dir, &state, &["--volume", "a", "--volume", "b"]).unwrap();
    let log = server.stop();
    for want in [
        "/dev/nbd0",
        "/dev/nbd1",
        "fuse-a/disk",
        "fuse-b/disk",
        "until [ -e fuse-a/disk ]",
        "fusermount3 -u fuse-b",
    ] {
        assert!(log.contains(want), "missing {want:?}:\n{log}");
    }
    // A raw export of a managed volume's file is warned about (read-only: nothing written).
    let dir2 = TempDir::new("mist-hints-raw");
    let mut rng = Rng::new(1);
    let (key, _) = common::key_file(&dir2, "k", &mut rng);
    let spec = format!(
        "name=x,file={},key-file={},read-only",
        state.join("volumes/a.img").display(),
        key.display()
    );
    let server = Server::start(&dir2, &[spec]);
    let log = server.stop();
    assert!(log.contains("is a managed nbdcrypt volume"), "{log}");
    // Non-loopback without TLS: warned before binding (TEST-NET-1 is never ours, so the bind
    // itself fails and nothing listens).
    let (ok, _, err) = cli(
        &state,
        &["serve", "--volume", "a", "--listen", "192.0.2.1:10809"],
    );
    assert!(!ok);
    assert!(err.contains("non-loopback address without TLS"), "{err}");
}
