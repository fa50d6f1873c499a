//! `scripts/scratch-volume.sh` on a machine without the nbd kernel module (this one): `up`
//! takes the nbdfuse + loop path, formats and mounts; a second `up` changes nothing; `down`
//! unmounts, detaches, stops the server and deletes the volume; and after an `up` killed at
//! several points, `down` still leaves nothing behind. The kernel nbd-client path of the same
//! script runs inside the VM (`scripts/vm-e2e.sh`).
//! Peers: nbdfuse, losetup, mkfs.ext4, mount (root), /dev/fuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn prerequisites() -> Result<(), String> {
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "bash", "timeout"] {
        have(tool)?;
    }
    if run_ok(Command::new("id").arg("-u")).trim() != "0" {
        return Err("needs root for losetup and mount".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    if Path::new("/sys/module/nbd").exists() {
        return Err(
            "this machine has the nbd module: the nbdfuse path is not the one taken".into(),
        );
    }
    Ok(())
}

struct Env {
    dir: TempDir,
    /// Volumes brought up, taken down again on drop (also when an assertion failed).
    names: std::cell::RefCell<Vec<String>>,
}

impl Env {
    fn new(tag: &str) -> Env {
        Env {
            dir: TempDir::new(tag),
            names: Default::default(),
        }
    }

    /// `bash scripts/scratch-volume.sh ARGS`, run under `prefix` (e.g. `timeout`) if given.
    fn command(&self, prefix: &[&str], args: &[&str]) -> Command {
        if let ["up", name, ..] = args {
            self.names.borrow_mut().push((*name).to_owned());
        }
        let mut c = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("bash");
                c
            }
            None => Command::new("bash"),
        };
        c.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/scratch-volume.sh"
        ))
        .args(args)
        .env("NBDCRYPT", env!("CARGO_BIN_EXE_nbdcrypt"))
        .env("NBDCRYPT_STATE_DIR", self.dir.path("state"))
        .env("NBDCRYPT_SCRATCH_RUN", self.dir.path("run"));
        c
    }

    fn script(&self, args: &[&str]) -> Output {
        self.command(&[], args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.script(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "scratch-volume.sh {args:?} failed:\n{err}"
        );
        err
    }

    fn mounted(&self, mountpoint: &Path) -> bool {
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(mountpoint.to_str().unwrap()))
    }

    /// Nothing of the volume is left: no mount, no FUSE mount, no loop device over it, no
    /// process, no backing file, and the registry says deleted.
    fn assert_gone(&self, name: &str, mountpoint: &Path) {
        assert!(!self.mounted(mountpoint));
        let run = self.dir.path("run");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(!mounts.contains(run.to_str().unwrap()), "{mounts}");
        let loops = run_ok(Command::new("losetup").arg("-a"));
        assert!(!loops.contains(run.to_str().unwrap()), "{loops}");
        let ps = run_ok(Command::new("ps").args(["-eo", "args"]));
        // The server (its --ready-file) and nbdfuse (its mount) both name the run directory.
        assert!(
            !ps.lines().any(|l| l.contains(run.to_str().unwrap())),
            "{ps}"
        );
        let state = self.dir.path("state");
        assert!(!state.join(format!("volumes/{name}.img")).exists());
        let out = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"))
            .args(["--log", "error", "volume", "describe", name, "--json"])
            .env("NBDCRYPT_STATE_DIR", &state)
            .output()
            .unwrap();
        let desc = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        // Deleted, or never created (an `up` killed before `volume create` finished).
        assert!(
            desc.contains("\"state\": \"deleted\"")
                || (!out.status.success() && err.contains(name)),
            "{desc}{err}"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for name in self.names.borrow().iter() {
            let _ = self.command(&[], &["down", name]).output();
        }
    }
}

#[test]
fn scratch_volume_up_takes_nbdfuse_path_and_down_shreds() {
    if !peer_available("nbdfuse + losetup + mount (root)", prerequisites()) {
        return;
    }
    let env = Env::new("scratch-script");
    let mnt = env.dir.path("mnt");
    let m = mnt.to_str().unwrap();
    let up = env.ok(&["up", "job", "96M", m]);
    assert!(up.contains("no nbd kernel module"), "{up}");
    assert!(up.contains("nbdfuse + loop device"), "{up}");
    assert!(up.contains("mkfs: ext4"), "{up}");
    assert!(env.mounted(&mnt));
    std::fs::write(mnt.join("data"), vec![7u8; 1 << 20]).unwrap();
    // Idempotent: every step reports it is done already.
    let again = env.ok(&["up", "job", "96M", m]);
    for done in [
        "exists",
        "already running",
        "already attached",
        "already has a filesystem",
        "already mounted",
    ] {
        assert!(again.contains(done), "{done}: {again}");
    }
    assert_eq!(std::fs::read(mnt.join("data")).unwrap().len(), 1 << 20);
    // status reports and succeeds without systemd.
    let status = env.script(&["status", "job"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "status failed: {text}");
    assert!(
        text.contains("server     running") && text.contains("mountpoint"),
        "{text}"
    );
    let down = env.ok(&["down", "job"]);
    assert!(down.contains("is gone and its key destroyed"), "{down}");
    env.assert_gone("job", &mnt);
    // down again: nothing to do, still fine; and for a volume that never existed (an `up`
    // killed before it created the volume).
    env.ok(&["down", "job"]);
    let never = env.ok(&["down", "never"]);
    assert!(never.contains("does not exist"), "{never}");
}

#[test]
fn scratch_volume_down_cleans_up_after_an_interrupted_up() {
    if !peer_available("nbdfuse + losetup + mount (root)", prerequisites()) {
        return;
    }
    let env = Env::new("scratch-interrupt");
    let mnt = env.dir.path("mnt");
    let m = mnt.to_str().unwrap();
    // Kill `up` (SIGKILL: no trap runs) at several points of its way.
    for (i, after) in [200u64, 450, 700, 1000].into_iter().enumerate() {
        let name = format!("cut{i}");
        let limit = format!("{}", after as f64 / 1000.0);
        let _ = env
            .command(&["timeout", "-s", "KILL", &limit], &["up", &name, "64M", m])
            .output()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        env.ok(&["down", &name]);
        env.assert_gone(&name, &mnt);
    }
}
