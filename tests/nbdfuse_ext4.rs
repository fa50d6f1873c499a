//! The user's door without a kernel NBD driver: nbdfuse exposes the export as a file, a loop
//! device (4 KiB logical blocks, matching the volume's sector size) carries ext4. Files written
//! before a server restart read back with the same sha256, and `e2fsck -fn` finds nothing.
//! Also with the loop device's default 512-byte blocks on a 4 KiB-sector volume: the server
//! advertises a minimum block size of 1, so libnbd passes the unaligned I/O through and the
//! server read-modify-writes it. Needs root, /dev/fuse and loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::ext4::{self, LIMIT, prerequisites, tear_down};
use common::kernel::{Fuse, LoopDev, Mount};
use common::{Rng, Server, TempDir, key_file, peer_available, run_ok, seed};

#[test]
fn ext4_on_nbdfuse_survives_a_server_restart() {
    if !peer_available("nbdfuse + losetup + mkfs.ext4", prerequisites()) {
        return;
    }
    let dir = TempDir::new("ext4");
    let mut rng = Rng::new(seed("ext4"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = format!(
        "name=fs,file={},key-file={},size=256M,discards",
        dir.path("fs.img").display(),
        key.display()
    );
    ext4::survives_a_server_restart(
        &dir,
        &spec,
        "fs",
        &[1, 4095, 4096, 100_000, 3 << 20, 17 << 20],
        &mut rng,
    );
}

/// `losetup` with its defaults (512-byte logical blocks) over a 4 KiB-sector volume: mkfs,
/// mount, write, fsck and read back. With the sector size advertised as the *minimum* block
/// size, libnbd refused the 512-byte I/O, mkfs.ext4 still reported success and mount failed
/// with "can't read superblock".
#[test]
fn ext4_on_nbdfuse_with_default_512_byte_loop_blocks() {
    if !peer_available("nbdfuse + losetup + mkfs.ext4", prerequisites()) {
        return;
    }
    let dir = TempDir::new("ext4-512");
    let mut rng = Rng::new(seed("ext4 512"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = format!(
        "name=fs,file={},key-file={},size=128M,sector-size=4096",
        dir.path("fs.img").display(),
        key.display()
    );
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let server = Server::start(&dir, &[spec]);
    let fuse = Fuse::mount(&dir.path("fuse"), &server.uri("fs"), LIMIT);
    let lo = LoopDev::attach(&fuse.dir.join("disk"));
    let bs = run_ok(Command::new("blockdev").arg("--getss").arg(&lo.0));
    assert_eq!(
        bs.trim(),
        "512",
        "the loop device should use its default block size"
    );
    // 1 KiB file system blocks: every metadata write is smaller than a sector.
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024"])
            .arg(&lo.0),
    );
    let m = Mount::new(&lo.0, &mnt);
    let data = rng.bytes(3_000_001);
    std::fs::write(mnt.join("odd"), &data).unwrap();
    run_ok(&mut Command::new("sync"));
    assert!(m.unmount(), "the file system stayed busy");
    let fsck = run_ok(Command::new("e2fsck").arg("-fn").arg(&lo.0));
    assert!(fsck.contains("files"), "{fsck}");
    let m = Mount::new(&lo.0, &mnt);
    assert!(std::fs::read(mnt.join("odd")).unwrap() == data);
    tear_down(m, lo, fuse);
}
