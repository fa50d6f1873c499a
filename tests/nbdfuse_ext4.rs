//! The user's door without a kernel NBD driver: nbdfuse exposes the export as a file, a loop
//! device (4 KiB logical blocks, matching the volume's sector size) carries ext4. Files written
//! before a server restart read back with the same sha256, and `e2fsck -fn` finds nothing.
//! Also with the loop device's default 512-byte blocks on a 4 KiB-sector volume: the server
//! advertises a minimum block size of 1, so libnbd passes the unaligned I/O through and the
//! server read-modify-writes it. Needs root, /dev/fuse and loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{Rng, Server, TempDir, have, key_file, peer_available, run_ok, seed};

struct Fuse {
    child: Child,
    dir: std::path::PathBuf,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new("nbdfuse")
            .arg(dir.join("disk"))
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let start = std::time::Instant::now();
        while !dir.join("disk").exists() {
            assert!(start.elapsed().as_secs() < 20, "nbdfuse did not come up");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Fuse {
            child,
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        Self::attach_with(file, &["-b", "4096"])
    }

    fn attach_with(file: &Path, opts: &[&str]) -> Loop {
        let out = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(opts)
                .arg(file),
        );
        Loop(out.trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn prerequisites() -> Result<(), String> {
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "sha256sum"] {
        have(tool)?;
    }
    // Only root can attach loop devices and mount.
    let uid = run_ok(Command::new("id").arg("-u"));
    if uid.trim() != "0" {
        return Err("needs root for losetup and mount".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    Ok(())
}

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
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut sums = Vec::new();
    {
        let server = Server::start(&dir, std::slice::from_ref(&spec));
        let fuse = Fuse::mount(&dir.path("fuse"), &server.uri("fs"));
        let lo = Loop::attach(&fuse.dir.join("disk"));
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.0));
        run_ok(Command::new("mount").arg(&lo.0).arg(&mnt));
        let m = Mount(mnt.clone());
        for (i, size) in [1usize, 4095, 4096, 100_000, 3 << 20, 17 << 20]
            .iter()
            .enumerate()
        {
            let p = mnt.join(format!("file{i}"));
            std::fs::write(&p, rng.bytes(*size)).unwrap();
            sums.push((
                format!("file{i}"),
                run_ok(Command::new("sha256sum").arg(&p)),
            ));
        }
        run_ok(&mut Command::new("sync"));
        drop(m);
        drop(lo);
        drop(fuse);
        let log = server.stop();
        assert!(log.contains("flushed"), "{log}");
    }
    let server = Server::start(&dir, &[spec]);
    let fuse = Fuse::mount(&dir.path("fuse"), &server.uri("fs"));
    let lo = Loop::attach(&fuse.dir.join("disk"));
    let fsck = run_ok(Command::new("e2fsck").arg("-fn").arg(&lo.0));
    assert!(fsck.contains("files"), "{fsck}");
    run_ok(Command::new("mount").arg(&lo.0).arg(&mnt));
    let m = Mount(mnt.clone());
    for (name, sum) in &sums {
        assert_eq!(
            &run_ok(Command::new("sha256sum").arg(mnt.join(name))),
            sum,
            "{name}"
        );
    }
    drop(m);
    drop(lo);
    drop(fuse);
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
    let fuse = Fuse::mount(&dir.path("fuse"), &server.uri("fs"));
    let lo = Loop::attach_with(&fuse.dir.join("disk"), &[]);
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
    run_ok(Command::new("mount").arg(&lo.0).arg(&mnt));
    let m = Mount(mnt.clone());
    let data = rng.bytes(3_000_001);
    std::fs::write(mnt.join("odd"), &data).unwrap();
    run_ok(&mut Command::new("sync"));
    drop(m);
    let fsck = run_ok(Command::new("e2fsck").arg("-fn").arg(&lo.0));
    assert!(fsck.contains("files"), "{fsck}");
    run_ok(Command::new("mount").arg(&lo.0).arg(&mnt));
    let m = Mount(mnt.clone());
    assert!(std::fs::read(mnt.join("odd")).unwrap() == data);
    drop(m);
    drop(lo);
    drop(fuse);
}
