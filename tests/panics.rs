//! A panic in one request costs that request an `EIO` and nothing else, wherever it runs:
//! inline on its connection, on the crypto workers (where rayon would abort the whole
//! process), or on the blocking pool. The fault hook `NBDCRYPT_PANIC_AT_OFFSET` makes a READ or
//! WRITE at that offset panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};

use common::*;
use nbdcrypt::protocol::consts::{cmd, cmd_flag, err};

const AT: u64 = 1 << 20;

fn reply_error<S: Read>(s: &mut S, data_len: usize) -> u32 {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("a reply, not a dead server");
    let e = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if e == 0 {
        let mut d = vec![0u8; data_len];
        s.read_exact(&mut d).unwrap();
    }
    e
}

#[test]
fn panics_in_any_placement_answer_eio_and_the_server_carries_on() {
    let dir = TempDir::new("panics");
    let spec = keyed_export(&dir, "p", ",size=16M");
    let server = Server::try_start(
        &dir,
        &[spec],
        &["--split-bytes", "128K"],
        &[("NBDCRYPT_PANIC_AT_OFFSET", &AT.to_string())],
    )
    .unwrap();
    let mut s = raw_connect(&server.addr, "p");
    // Inline: a small read.
    s.write_all(&raw_request(cmd::READ, 1, AT, 4096)).unwrap();
    assert_eq!(reply_error(&mut s, 4096), err::EIO);
    // Crypto workers: large reads pipelined behind others whose replies are still being
    // written (this client reads nothing until it has sent everything).
    let mut b = Vec::new();
    for i in 0..8 {
        b.extend(raw_request(cmd::READ, 20 + i, 0, 1 << 20));
    }
    b.extend(raw_request(cmd::READ, 3, AT, 1 << 20));
    s.write_all(&b).unwrap();
    let mut errors = Vec::new();
    for _ in 0..9 {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let e = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if e == 0 {
            let mut d = vec![0u8; 1 << 20];
            s.read_exact(&mut d).unwrap();
        }
        errors.push((cookie, e));
    }
    errors.sort_unstable();
    assert_eq!(errors[0], (3, err::EIO));
    assert!(errors[1..].iter().all(|&(_, e)| e == 0), "{errors:?}");
    // Blocking pool: a FUA write.
    let mut w = raw_request(cmd::WRITE, 4, AT, 4096);
    w[4..6].copy_from_slice(&cmd_flag::FUA.to_be_bytes());
    w.extend_from_slice(&[5u8; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(reply_error(&mut s, 0), err::EIO);
    // Everything else still works, on this connection and a new one.
    raw_write(&mut s, 5, 8192, &[9u8; 300_000], 0);
    assert_eq!(raw_read(&mut s, 6, 8192, 300_000), vec![9u8; 300_000]);
    let mut fresh = raw_connect(&server.addr, "p");
    assert_eq!(raw_read(&mut fresh, 7, 8192, 4096), vec![9u8; 4096]);
    let log = server.stop();
    assert_eq!(log.matches("request panicked").count(), 3, "{log}");
    // Each placement was really taken (the close lines count where requests ran).
    let count = |place: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("connection closed") && l.contains("inline="))
            .filter_map(|l| {
                l.split(place)
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|d| d.parse::<u64>().ok())
            })
            .sum()
    };
    for place in ["workers=", "blocking="] {
        assert!(count(place) >= 1, "no request ran with {place}: {log}");
    }
    assert!(log.contains("stopped"), "{log}");
}

/// The same over an upstream NBD export, where reads and writes are submitted (no thread waits
/// for them) and a write is encrypted before it is sent: a panic while encrypting a submitted
/// write, or while decrypting a submitted read, costs that request an `EIO`; nothing of the
/// write reaches the upstream, and the server carries on.
#[test]
fn panics_on_the_submitted_path_answer_eio_and_the_server_carries_on() {
    if !common::peer_available("nbdkit", common::have("nbdkit")) {
        return;
    }
    let dir = TempDir::new("panics-upstream");
    let kit = common::nbdkit::Nbdkit::start(&dir, "kit", &["memory", "16M"]);
    let mut rng = Rng::new(seed("panics upstream"));
    let spec = kit.export_spec(&dir, "p", &mut rng);
    let server = Server::try_start(
        &dir,
        &[spec],
        &[],
        &[("NBDCRYPT_PANIC_AT_OFFSET", &AT.to_string())],
    )
    .unwrap();
    let mut s = raw_connect(&server.addr, "p");
    // A small write (encrypted inline) and a large one (on a crypto worker).
    for (cookie, len) in [(2u64, 4096usize), (3, 1 << 20)] {
        let mut w = raw_request(cmd::WRITE, cookie, AT, u32::try_from(len).unwrap());
        w.extend_from_slice(&vec![7u8; len]);
        s.write_all(&w).unwrap();
        assert_eq!(reply_error(&mut s, 0), err::EIO, "{len}-byte write");
    }
    s.write_all(&raw_request(cmd::READ, 4, AT, 4096)).unwrap();
    assert_eq!(reply_error(&mut s, 4096), err::EIO);
    // Everything else still works; the failed writes left the sector as it was.
    raw_write(&mut s, 5, 8192, &[9u8; 65536], 0);
    assert_eq!(raw_read(&mut s, 6, 8192, 65536), vec![9u8; 65536]);
    let log = server.stop();
    assert!(log.matches("request panicked").count() >= 3, "{log}");
    assert!(common::placed(&log, "submitted") >= 4, "{log}");
    // The export is raw (no header): volume offsets are upstream offsets. Nothing of the
    // failed writes went up (nbdkit's memory starts as zeroes).
    let store = nbdcrypt::upstream::NbdStore::open(&kit.uri("")).unwrap();
    let mut up = vec![0xFFu8; 1 << 20];
    nbdcrypt::storage::Storage::read_at(&store, &mut up, AT).unwrap();
    assert!(
        up.iter().all(|&b| b == 0),
        "a failed write reached the upstream"
    );
}
