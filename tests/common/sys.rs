//! The machine around a test: `/proc` of a process, loopback ports and a TCP forwarder.

/// The value of `Field:` in a `/proc/…/status` text, whitespace-normalised.
pub fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `status_field` of `/proc/PID/status`.
pub fn proc_status(pid: u32, field: &str) -> String {
    status_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap(),
        field,
    )
}

/// What each open descriptor of `pid` points at (`socket:[…]`, paths, …).
pub fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A TCP forwarder from `listen` to `upstream` (every connection, both directions), which
/// starts listening only after `delay` (at once for zero) and records every byte it forwards.
pub fn tcp_forward(
    listen: String,
    upstream: String,
    delay: std::time::Duration,
) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&seen);
    // Without a delay, listen before returning, so the caller can connect at once.
    let bound = delay
        .is_zero()
        .then(|| std::net::TcpListener::bind(&listen).unwrap());
    std::thread::spawn(move || {
        let l = bound.unwrap_or_else(|| {
            std::thread::sleep(delay);
            std::net::TcpListener::bind(&listen).unwrap()
        });
        for client in l.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let rec = Arc::clone(&rec);
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut b = [0u8; 65536];
                    while let Ok(n) = from.read(&mut b) {
                        if n == 0 || to.write_all(&b[..n]).is_err() {
                            break;
                        }
                        rec.lock().unwrap().extend_from_slice(&b[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    seen
}

/// A loopback TCP port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
