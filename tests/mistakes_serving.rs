//! Operator mistakes (issue 12) while a volume is served: a second server, a second raw
//! export, `volume delete` (refused, or forced: clients cut off, key wiped), a KMS key disabled
//! under `--kms-recheck`. Each checks that nothing was lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::volumes::*;
use common::{Rng, Server, TempDir, raw_connect, raw_flush, raw_read, raw_write};

#[test]
fn second_server_of_a_volume_is_refused_naming_the_holder() {
    let dir = TempDir::new("mist-twice");
    let dir2 = TempDir::new("mist-twice-b");
    let state = dir.path("state");
    cli_ok(
        &state,
        &[
            "volume",
            "create",
            "p1",
            "--size",
            "16M",
            "--type",
            "persistent",
        ],
    );
    let mut first = serve(&dir, &state, &["--volume", "p1", "--lease-interval", "1"]).unwrap();
    let pid = first.child.id();
    let log = serve(&dir2, &state, &["--volume", "p1"])
        .map(|_| ())
        .unwrap_err();
    assert!(
        log.contains(&format!("is being served by pid {pid} on node")),
        "{log}"
    );
    // --take-over cannot take a live server's volume on this node.
    let log = serve(&dir2, &state, &["--volume", "p1", "--take-over"])
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains(&format!("pid {pid}")), "{log}");
    let data = Rng::new(9).bytes(4096);
    write_through(&first, "p1", &data);
    // A crash leaves the lease in the header; the next server on this node takes it over.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let desc = cli_ok(&state, &["volume", "describe", "p1"]);
    assert!(desc.contains(&format!("served_by    pid {pid}")), "{desc}");
    let second = serve(&dir2, &state, &["--volume", "p1"]).unwrap();
    let log = second.wait_for_log("taking over the lease");
    assert!(log.contains("ended without releasing it"), "{log}");
    assert_eq!(read_through(&second, "p1", 4096), data);
    // A clean stop clears the lease.
    second.stop();
    let desc = cli_ok(&state, &["volume", "describe", "p1"]);
    assert!(!desc.contains("served_by"), "{desc}");
}

#[test]
fn second_raw_export_of_a_file_is_refused() {
    let dir = TempDir::new("mist-raw");
    let dir2 = TempDir::new("mist-raw-b");
    let spec = common::keyed_export(&dir, "r", ",size=1M");
    let _first = Server::start(&dir, std::slice::from_ref(&spec));
    let log = Server::try_start(&dir2, &[spec], &[], &[])
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("one writer per store"), "{log}");
}

#[test]
fn delete_of_a_served_volume_is_refused_and_forced_cuts_clients_within_a_second() {
    let dir = TempDir::new("mist-delete");
    let state = dir.path("state");
    cli_ok(&state, &["volume", "create", "s9", "--size", "16M"]);
    let server = serve(&dir, &state, &["--volume", "s9"]).unwrap();
    let pid = server.child.id();
    let mut client = raw_connect(&server.addr, "s9");
    let data = Rng::new(11).bytes(8192);
    raw_write(&mut client, 1, 0, &data, 0);
    raw_flush(&mut client, 2);
    let err = cli_err(&state, &["volume", "delete", "s9"]);
    assert!(
        err.contains(&format!("being served by pid {pid}")) && err.contains("--force"),
        "{err}"
    );
    // Nothing happened: the client still reads its data, the store and entry are there.
    assert_eq!(raw_read(&mut client, 3, 0, 8192), data);
    assert!(state.join("volumes/s9.img").exists());
    assert_eq!(listed(&state), vec![("s9".into(), "available".into())]);

    let start = Instant::now();
    cli_ok(&state, &["volume", "delete", "s9", "--force"]);
    let log = server.wait_for_log("volume key destroyed in memory");
    let destroyed = start.elapsed();
    assert!(log.contains("volume key destroyed in memory"), "{log}");
    assert!(
        destroyed < Duration::from_secs(2),
        "key destroyed after {destroyed:?}"
    );
    let cut = within(Duration::from_secs(2), || cut_off(&mut client));
    assert!(
        cut.is_some(),
        "the open connection still works after delete --force"
    );
    // New connections are refused; the volume is gone from the registry and the disk.
    let mut fresh = std::net::TcpStream::connect(&server.addr).unwrap();
    let mut greeting = [0u8; 18];
    fresh.read_exact(&mut greeting).unwrap();
    assert!(!state.join("volumes/s9.img").exists());
    assert_eq!(listed(&state), vec![("s9".into(), "deleted".into())]);
    eprintln!("key destroyed {destroyed:?} after delete --force started");
}

#[test]
fn kms_recheck_withdraws_a_volume_whose_key_is_disabled() {
    let dir = TempDir::new("mist-recheck");
    let state = dir.path("state");
    cli_ok(&state, &["kms", "create-key", "--alias", "alias/db"]);
    cli_ok(
        &state,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "16M",
            "--type",
            "persistent",
            "--kms-key",
            "alias/db",
        ],
    );
    let server = serve(&dir, &state, &["--volume", "db", "--kms-recheck", "0.3"]).unwrap();
    let mut client = raw_connect(&server.addr, "db");
    raw_write(&mut client, 1, 0, &[7u8; 4096], 0);
    let rechecks = || {
        nbdcrypt::kms::local::LocalKms::open(&state)
            .audit()
            .read_all()
            .unwrap()
            .iter()
            .filter(|r| r.operation == "Decrypt" && r.purpose.as_deref() == Some("recheck"))
            .count()
    };
    assert!(within(Duration::from_secs(5), || rechecks() >= 2).is_some());
    assert_eq!(raw_read(&mut client, 2, 0, 4096), vec![7u8; 4096]);
    cli_ok(&state, &["kms", "disable-key", "alias/db"]);
    let log = server.wait_for_log("volume key destroyed in memory");
    assert!(log.contains("KMS recheck: DisabledException"), "{log}");
    assert!(
        within(Duration::from_secs(3), || cut_off(&mut client)).is_some(),
        "the connection survived a disabled key"
    );
    let denied = nbdcrypt::kms::local::LocalKms::open(&state)
        .audit()
        .read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.purpose.as_deref() == Some("recheck") && r.outcome != "success")
        .count();
    assert!(denied >= 1, "the failed recheck is not in the audit log");
}

/// A backing file truncated under the server (an operator mistake; reads decrypt from a
/// mapping of the file, where bytes that are gone raise SIGBUS): what is left reads back, what
/// is gone reads as zeroes (as a shorter file does), the server stays up, and the log says
/// that the volume's mapping was retired. Without the SIGBUS guard the server dies here.
#[test]
fn a_backing_file_truncated_under_the_server_reads_zeroes_and_crashes_nothing() {
    let dir = TempDir::new("mist-trunc");
    let spec = common::keyed_export(&dir, "t", ",size=8M");
    let mut server = Server::start(&dir, &[spec]);
    let data = Rng::new(common::seed("mist-trunc")).bytes(8 << 20);
    let mut s = raw_connect(&server.addr, "t");
    raw_write(&mut s, 1, 0, &data, 0);
    raw_flush(&mut s, 2);
    assert!(raw_read(&mut s, 3, 0, 8 << 20) == data, "read back before");
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path("t.img"))
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let back = raw_read(&mut s, 4, 0, 8 << 20);
    assert!(back[..2 << 20] == data[..2 << 20], "the bytes left differ");
    assert!(
        back[2 << 20..].iter().all(|&b| b == 0),
        "the bytes gone do not read as zeroes"
    );
    // Still serving, on this connection and a new one.
    assert!(raw_read(&mut s, 5, 4096, 4096) == data[4096..8192]);
    let mut again = raw_connect(&server.addr, "t");
    assert!(raw_read(&mut again, 6, 0, 1 << 20) == data[..1 << 20]);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    let log = server.stop();
    assert!(
        log.contains("faulted (an I/O error, or the file was truncated)"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
