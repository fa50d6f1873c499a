//! The user's door without a kernel NBD driver: nbdfuse exposes the export as a file, a loop
//! device (4 KiB logical blocks, matching the volume's sector size and advertised minimum block
//! size) carries ext4. Files written before a server restart read back with the same sha256,
//! and `e2fsck -fn` finds nothing. Needs root, /dev/fuse and loop devices.
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
        let out = run_ok(
            Command::new("losetup")
                .args(["-f", "--show", "-b", "4096"])
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
