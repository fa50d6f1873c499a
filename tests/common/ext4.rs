//! ext4 through nbdfuse and a loop device (the user's door where no kernel NBD driver exists),
//! shared by tests/nbdfuse_ext4.rs (a file backing) and tests/ceph.rs (an RBD backing).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::kernel::{Fuse, LoopDev, Mount};
use super::{Rng, Server, TempDir, have, run_ok};

/// Each test's mounts come down within this, or the watchdog fails them.
pub const LIMIT: Duration = Duration::from_secs(300);

/// What the scenario needs: nbdfuse, losetup and mkfs.ext4, root, /dev/fuse.
pub fn prerequisites() -> Result<(), String> {
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "sha256sum"] {
        have(tool)?;
    }
    // Only root can attach loop devices and mount.
    if run_ok(Command::new("id").arg("-u")).trim() != "0" {
        return Err("needs root for losetup and mount".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    Ok(())
}

/// Unmounts in order and insists that it went cleanly: a mount that stays busy is a finding.
pub fn tear_down(m: Mount, lo: LoopDev, fuse: Fuse) {
    assert!(m.unmount(), "the file system stayed busy");
    assert!(lo.detach(), "{} did not detach", lo.0);
    fuse.unmount().expect("nbdfuse unmounts cleanly");
}

/// A server with the export `spec` (named `export`): ext4 made on it (4 KiB loop blocks),
/// files of `sizes` written, everything unmounted and the server stopped (it must log its
/// flush); then a new server: `e2fsck -fn` clean and every file's sha256 the same.
pub fn survives_a_server_restart(
    dir: &TempDir,
    spec: &str,
    export: &str,
    sizes: &[usize],
    rng: &mut Rng,
) {
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut sums = Vec::new();
    {
        let server = Server::start(dir, &[spec.to_owned()]);
        let fuse = Fuse::mount(&dir.path("fuse"), &server.uri(export), LIMIT);
        let lo = LoopDev::attach_with(&fuse.dir.join("disk"), &["-b", "4096"]);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.0));
        let m = Mount::new(&lo.0, &mnt);
        for (i, size) in sizes.iter().enumerate() {
            let p = mnt.join(format!("file{i}"));
            std::fs::write(&p, rng.bytes(*size)).unwrap();
            sums.push((
                format!("file{i}"),
                run_ok(Command::new("sha256sum").arg(&p)),
            ));
        }
        run_ok(&mut Command::new("sync"));
        tear_down(m, lo, fuse);
        let log = server.stop();
        assert!(log.contains("flushed"), "{log}");
    }
    let server = Server::start(dir, &[spec.to_owned()]);
    let fuse = Fuse::mount(&dir.path("fuse"), &server.uri(export), LIMIT);
    let lo = LoopDev::attach_with(&fuse.dir.join("disk"), &["-b", "4096"]);
    let fsck = run_ok(Command::new("e2fsck").arg("-fn").arg(&lo.0));
    assert!(fsck.contains("files"), "{fsck}");
    let m = Mount::new(&lo.0, &mnt);
    for (name, sum) in &sums {
        assert_eq!(
            &run_ok(Command::new("sha256sum").arg(mnt.join(name))),
            sum,
            "{name}"
        );
    }
    tear_down(m, lo, fuse);
}
