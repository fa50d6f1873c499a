//! A connection flood against a running server: thousands of connections that stay silent,
//! send garbage, or greet and vanish, while an established client keeps working.
//!
//! What must hold: the server never has more than `--max-connections` client sockets open
//! (the rest wait in the kernel's accept queue), silent clients are cut off by
//! `--handshake-timeout`, the server's peak memory grows by a bounded amount, the established
//! client keeps its throughput (a loose floor: starvation would be near zero, noise is not),
//! and a new client is served once the flood stops. The measured numbers are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    Server, TempDir, fd_targets, keyed_export, proc_status, raw_connect, raw_read, raw_write,
};

const MAX_CONNECTIONS: usize = 16;

/// `VmHWM`/`VmRSS` of a process, in KiB.
fn vm_kib(pid: u32, field: &str) -> u64 {
    let v = proc_status(pid, field);
    v.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Open TCP sockets of the server process other than the listener.
fn client_sockets(pid: u32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|t| t.starts_with("socket:"))
        .count()
        .saturating_sub(1)
}

/// 4 KiB write-then-read pairs on an established connection for `for_how_long`; returns
/// pairs/s.
fn workload(s: &mut TcpStream, for_how_long: Duration) -> f64 {
    let start = Instant::now();
    let mut pairs = 0u64;
    let data = [0x6bu8; 4096];
    while start.elapsed() < for_how_long {
        let off = (pairs % 512) * 4096;
        raw_write(s, 1, off, &data, 0);
        assert_eq!(
            raw_read(s, 2, off, 4096),
            data,
            "read back wrong data during the flood"
        );
        pairs += 1;
    }
    pairs as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn connection_flood_keeps_limits_memory_and_the_established_clients_throughput() {
    let dir = TempDir::new("flood");
    let max = MAX_CONNECTIONS.to_string();
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=16M")],
        &["--max-connections", &max, "--handshake-timeout", "1"],
    );
    let pid = server.child.id();
    let mut client = raw_connect(&server.addr, "d");
    let baseline = workload(&mut client, Duration::from_secs(3));
    let rss_before = vm_kib(pid, "VmRSS");
    // Sockets besides the clients' (the listener is already excluded; tokio's signal pipe).
    let own_sockets = client_sockets(pid) - 1;

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let peak_sockets = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for kind in [0, 1, 2, 0, 1, 2, 0, 1, 2] {
        let (stop, opened, attempts, addr) = (
            Arc::clone(&stop),
            Arc::clone(&opened),
            Arc::clone(&attempts),
            server.addr.clone(),
        );
        flooders.push(std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                // Once the accept queue is full, connects stall: give up quickly and retry.
                let target = addr.parse().unwrap();
                attempts.fetch_add(1, Ordering::Relaxed);
                let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(100))
                else {
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                match kind {
                    // Silent: holds a slot until the handshake timeout.
                    0 => {}
                    // Garbage instead of client flags.
                    1 => {
                        let _ = s.write_all(&[0xff; 64]);
                    }
                    // Valid flags, then an option header announcing 1 GiB of data.
                    _ => {
                        let mut b = 1u32.to_be_bytes().to_vec();
                        b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
                        b.extend_from_slice(&3u32.to_be_bytes());
                        b.extend_from_slice(&(1u32 << 30).to_be_bytes());
                        let _ = s.write_all(&b);
                    }
                }
                held.push_back(s);
                // Keep a few hundred sockets open per thread, then let the oldest go.
                if held.len() > 300 {
                    held.pop_front();
                }
            }
        }));
    }
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak_sockets));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(
                    client_sockets(pid).saturating_sub(own_sockets),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let during = workload(&mut client, Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    sampler.join().unwrap();
    let hwm = vm_kib(pid, "VmHWM");
    let peak = peak_sockets.load(Ordering::Relaxed);
    let flood = opened.load(Ordering::Relaxed);
    let tried = attempts.load(Ordering::Relaxed);
    let ratio = during / baseline;
    println!(
        "flood: {tried} connection attempts, {flood} connected (the rest found the accept \
         queue full); established client {baseline:.0} → {during:.0} \
         write+read pairs/s ({ratio:.2}×); server sockets peak {peak} (limit {MAX_CONNECTIONS}); \
         RSS before {rss_before} KiB, peak {hwm} KiB"
    );
    // The kernel's accept queue bounds how many connect at all; the attempts are the pressure.
    assert!(
        flood > 100 && tried > 300,
        "the flood was too small to mean anything ({tried} attempts, {flood} connected)"
    );
    assert!(
        peak <= MAX_CONNECTIONS,
        "{peak} client sockets open at once (limit {MAX_CONNECTIONS})"
    );
    assert!(
        hwm < rss_before + 64 * 1024,
        "peak memory grew from {rss_before} KiB to {hwm} KiB"
    );
    assert!(
        ratio > 0.25,
        "the established client was starved: {baseline:.0} → {during:.0} pairs/s"
    );
    // After the flood: the silent ones are timed out, a new client is served.
    std::thread::sleep(Duration::from_millis(1500));
    let mut fresh = raw_connect(&server.addr, "d");
    assert!(workload(&mut fresh, Duration::from_millis(200)) > 0.0);
    drop((client, fresh));
    let log = server.stop();
    assert!(
        log.contains("negotiation took too long"),
        "silent clients were not timed out"
    );
    assert!(!log.contains("panicked"), "{log}");
}
