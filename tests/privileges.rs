//! `serve --user`: started as root, the server gives up root once its volumes are open and its
//! socket is bound, in every thread, and cannot get it back; a bad `--user` stops it before any
//! key is unwrapped. Needs root (the test machine and CI run as root); otherwise it fails when
//! `NBDCRYPT_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{
    Server, TempDir, keyed_export, peer_available, proc_status, raw_connect, raw_flush, raw_read,
    raw_write, status_field,
};

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

/// Runs its command as nobody (uid and gid 65534, no supplementary groups).
const AS_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// A command run as nobody.
fn as_nobody(program: &str) -> Command {
    let mut c = Command::new(AS_NOBODY[0]);
    c.args(&AS_NOBODY[1..]).arg(program);
    c
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
    let mut s = raw_connect(&server.addr, "d");
    raw_write(&mut s, 1, 4096, &[0x77; 4096], 0);
    raw_flush(&mut s, 2);
    assert_eq!(raw_read(&mut s, 3, 4096, 4096), [0x77; 4096]);
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
    let out = as_nobody(env!("CARGO_BIN_EXE_nbdcrypt"))
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
    assert_eq!(proc_status(pid, "Uid"), "65534 65534 65534 65534");
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
    let state = dir.path("state").display().to_string();
    let server = Server::try_start_wrapped(
        &dir,
        &[spec],
        &[],
        &[("NBDCRYPT_STATE_DIR", &state)],
        &AS_NOBODY,
    )
    .unwrap_or_else(|log| panic!("the server did not start as nobody:\n{log}"));
    let pid = server.child.id();
    assert_eq!(proc_status(pid, "Uid"), "65534 65534 65534 65534");
    // A dumpable process's /proc files belong to its own uid: this is the control.
    let own = Killed(as_nobody("sleep").arg("30").spawn().unwrap());
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
