//! `serve --user`: started as root, the server gives up root once its volumes are open and its
//! socket is bound, in every thread, and cannot get it back; a bad `--user` stops it before any
//! key is unwrapped. Needs root (the test machine and CI run as root); otherwise it fails when
//! `NBDCRYPT_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Server, TempDir, keyed_export, peer_available, raw_connect, raw_request};

fn root() -> Result<(), String> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&out.stdout).trim() == "0" {
        Ok(())
    } else {
        Err("not running as root".into())
    }
}

/// `Name:\tvalue` lines of /proc/PID/task/TID/status.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn serve_user_drops_root_in_every_thread_after_binding_and_still_serves() {
    if !peer_available("root", root()) {
        return;
    }
    let dir = TempDir::new("user-drop");
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=16M")],
        &["--user", "nobody", "--workers", "2"],
    );
    let pid = server.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tasks.len() >= 3, "expected runtime and worker threads");
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        assert_eq!(
            status_field(&status, "Uid"),
            "65534 65534 65534 65534",
            "{t:?}"
        );
        assert_eq!(
            status_field(&status, "Gid"),
            "65534 65534 65534 65534",
            "{t:?}"
        );
        assert_eq!(status_field(&status, "Groups"), "65534", "{t:?}");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{t:?}");
    }
    // Files opened as root keep working: a write and a read through the dropped server.
    use std::io::{Read, Write};
    let mut s = raw_connect(&server.addr, "d");
    let mut w = raw_request(nbdcrypt::protocol::consts::cmd::WRITE, 1, 4096, 4096);
    w.extend_from_slice(&[0x77; 4096]);
    w.extend_from_slice(&raw_request(
        nbdcrypt::protocol::consts::cmd::FLUSH,
        2,
        0,
        0,
    ));
    w.extend_from_slice(&raw_request(
        nbdcrypt::protocol::consts::cmd::READ,
        3,
        4096,
        4096,
    ));
    s.write_all(&w).unwrap();
    // Replies may come in any order; the read's carries its data.
    let mut r = [0u8; 16];
    let mut back = [0u8; 4096];
    for _ in 0..3 {
        s.read_exact(&mut r).unwrap();
        assert_eq!(&r[4..8], &[0; 4], "request failed after the drop");
        if r[8..16] == 3u64.to_be_bytes() {
            s.read_exact(&mut back).unwrap();
        }
    }
    assert_eq!(back, [0x77; 4096]);
    drop(s);
    let log = server.stop();
    assert!(log.contains("privileges dropped"), "{log}");
    assert!(log.contains("user=\"nobody\" uid=65534 gid=65534"), "{log}");
}

#[test]
fn serve_user_refuses_an_unknown_user_and_a_non_root_start() {
    if !peer_available("root", root()) {
        return;
    }
    let dir = TempDir::new("user-bad");
    let err = Server::try_start(
        &dir,
        &[keyed_export(&dir, "d", ",size=16M")],
        &["--user", "no-such-user-nbdcrypt"],
        &[],
    )
    .err()
    .expect("an unknown --user started");
    assert!(
        err.contains("--user no-such-user-nbdcrypt: no such user"),
        "{err}"
    );
    assert!(
        !err.contains("export ready"),
        "keys were unwrapped first:\n{err}"
    );

    // Started as nobody, it cannot become someone else: a clear error, not a silent root-less run.
    let state = dir.path("nobody-state");
    std::fs::create_dir(&state).unwrap();
    common::run_ok(Command::new("chown").arg("65534:65534").arg(&state));
    common::run_ok(Command::new("chmod").arg("755").arg(&dir.0));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_nbdcrypt"))
        .arg("--state-dir")
        .arg(&state)
        .args(["serve", "--listen", "127.0.0.1:0", "--user", "daemon"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--user daemon needs the server to start as root (it runs as uid 65534)"),
        "{stderr}"
    );
}

/// Owner uid of /proc/PID: the kernel gives a non-dumpable process's /proc files to root.
fn proc_owner(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid()
}

#[test]
fn serve_is_undumpable_while_keys_are_held_with_and_without_user() {
    if !peer_available("root", root()) {
        return;
    }
    // With --user: the drop resets dumpability; the server sets it again.
    let dir = TempDir::new("dumpable-user");
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=8M")],
        &["--user", "nobody"],
    );
    let pid = server.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Uid"), "65534 65534 65534 65534");
    assert_eq!(proc_owner(pid), 0, "the server (uid 65534) is dumpable");
    drop(server);

    // Started as an ordinary user: the same, from the first key on.
    let dir = TempDir::new("dumpable-plain");
    common::run_ok(Command::new("chmod").arg("755").arg(&dir.0));
    let spec = keyed_export(&dir, "d", ",size=8M");
    common::run_ok(
        Command::new("chown")
            .arg("-R")
            .arg("65534:65534")
            .arg(&dir.0),
    );
    let ready = dir.path("ready");
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_nbdcrypt"))
        .arg("--state-dir")
        .arg(dir.path("state"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &spec,
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&ready).is_ok_and(|s| s.ends_with('\n')) {
        assert!(start.elapsed().as_secs() < 30, "the server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.0.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Uid"), "65534 65534 65534 65534");
    // A dumpable process's /proc files belong to its own uid: this is the control.
    let own = Killed(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(proc_owner(own.0.id()), 65534, "control: a dumpable process");
    assert_eq!(proc_owner(pid), 0, "the server (uid 65534) is dumpable");
}

/// A child killed (and reaped) when the test ends, failed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
