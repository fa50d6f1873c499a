//! `volume resize` of a served volume, as a user grows a file system: ext4 on the volume
//! (through nbdfuse and a loop device, the door where no kernel NBD driver exists), detach,
//! grow the volume while the server runs, reattach (the new connection sees the new size),
//! `resize2fs`: old files intact, the new space usable, `e2fsck -fn` clean. Shrinking is
//! refused. Needs root, /dev/fuse and loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::ext4::{LIMIT, prerequisites, tear_down};
use common::kernel::{Fuse, LoopDev, Mount};
use common::volumes::{cli_err, cli_ok, create_on, serve, within};
use common::{Rng, TempDir, peer_available, run_ok, seed};

const MIB: u64 = 1 << 20;

fn sha(p: &std::path::Path) -> String {
    common::volumes::sha256(p)
}

#[test]
fn grow_a_served_volume_then_resize2fs() {
    // resize2fs comes with mkfs.ext4 (e2fsprogs).
    if !peer_available("nbdfuse + losetup + mkfs.ext4", prerequisites()) {
        return;
    }
    let dir = TempDir::new("resize");
    let state = dir.path("state");
    let mut rng = Rng::new(seed("resize"));
    let backing = dir.path("g.img");
    let (ok, _, err) = create_on(&state, "g", "64M", &backing, &[]);
    assert!(ok, "{err}");
    let server = serve(&dir, &state, &["--volume", "g"]).unwrap();
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // ext4 on the 64 MiB volume, two files.
    let mut sums = Vec::new();
    {
        let fuse = Fuse::mount(&dir.path("fuse"), &server.uri("g"), LIMIT);
        let lo = LoopDev::attach_with(&fuse.dir.join("disk"), &["-b", "4096"]);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.0));
        let m = Mount::new(&lo.0, &mnt);
        for (name, size) in [("a", 5_000_000), ("b", 20_000_001)] {
            let p = mnt.join(name);
            std::fs::write(&p, rng.bytes(size)).unwrap();
            sums.push((name, sha(&p)));
        }
        run_ok(&mut Command::new("sync"));
        tear_down(m, lo, fuse);
    }

    // Shrinking is refused; growing works while the server runs.
    let refused = cli_err(&state, &["volume", "resize", "g", "--size", "32M"]);
    assert!(
        refused.contains("shrinking it to 32 MiB is refused"),
        "{refused}"
    );
    let grown = cli_ok(&state, &["volume", "resize", "g", "--size", "192M"]);
    assert!(grown.contains("grown from 64 MiB to 192 MiB"), "{grown}");
    assert!(grown.contains("it is being served"), "{grown}");
    assert!(
        std::fs::metadata(&backing).unwrap().len() >= MIB + 192 * MIB,
        "the backing file was not extended"
    );
    assert!(
        within(Duration::from_secs(10), || std::fs::read_to_string(
            &server.log
        )
        .unwrap_or_default()
        .contains("volume grown"))
        .is_some(),
        "the server did not pick the new size up"
    );

    // Reattach: the new connection sees 192 MiB; grow the file system (offline, as resize2fs
    // wants it freshly checked).
    {
        let fuse = Fuse::mount(&dir.path("fuse2"), &server.uri("g"), LIMIT);
        let lo = LoopDev::attach_with(&fuse.dir.join("disk"), &["-b", "4096"]);
        let size = run_ok(Command::new("blockdev").arg("--getsize64").arg(&lo.0));
        assert_eq!(size.trim(), (192 * MIB).to_string());
        run_ok(Command::new("e2fsck").arg("-fp").arg(&lo.0));
        run_ok(Command::new("resize2fs").arg(&lo.0));
        let m = Mount::new(&lo.0, &mnt);
        for (name, sum) in &sums {
            assert_eq!(&sha(&mnt.join(name)), sum, "{name} changed");
        }
        // More than the old file system could ever hold.
        let big = rng.bytes(100_000_000);
        std::fs::write(mnt.join("big"), &big).unwrap();
        run_ok(&mut Command::new("sync"));
        let big_sum = sha(&mnt.join("big"));
        assert!(m.unmount(), "the file system stayed busy");
        let fsck = run_ok(Command::new("e2fsck").arg("-fn").arg(&lo.0));
        assert!(fsck.contains("files"), "{fsck}");
        let m = Mount::new(&lo.0, &mnt);
        assert_eq!(sha(&mnt.join("big")), big_sum);
        tear_down(m, lo, fuse);
    }
    server.stop();
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(&state, &["volume", "describe", "g", "--json"])).unwrap();
    assert_eq!(v["size"], 192 * MIB, "{v}");
}

#[test]
fn resize_refusals_name_the_problem() {
    let dir = TempDir::new("resize-refusals");
    let state = dir.path("state");
    let (ok, _, err) = create_on(&state, "r", "16M", &dir.path("r.img"), &[]);
    assert!(ok, "{err}");
    let err = cli_err(&state, &["volume", "resize", "r", "--size", "20001K"]);
    assert!(
        err.contains("is not a positive multiple of its 4096-byte sector size"),
        "{err}"
    );
    let err = cli_err(&state, &["volume", "resize", "nope", "--size", "32M"]);
    assert!(err.contains("no volume named \"nope\""), "{err}");
    let out = cli_ok(&state, &["volume", "resize", "r", "--size", "16M"]);
    assert!(out.contains("already 16 MiB"), "{out}");
    // Offline growth: the next server serves the new size.
    cli_ok(&state, &["volume", "resize", "r", "--size", "48M"]);
    let server = serve(&dir, &state, &["--volume", "r"]).unwrap();
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(server.uri("r")));
    assert_eq!(out.trim(), (48 * MIB).to_string());
    server.stop();
}
