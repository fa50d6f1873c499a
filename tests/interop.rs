//! The server against real NBD clients: qemu-io, nbdinfo, nbdcopy, fio's nbd engine, and an
//! independent decryption of the backing file with Python `cryptography`.
//!
//! Every test starts its own `nbdcrypt serve` on a free loopback port and stops it with
//! SIGTERM. A missing peer fails the test when `NBDCRYPT_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Rng, Server, TempDir, have, key_file, peer_available, python, run_ok, seed};

use common::export_spec as export;

#[test]
fn qemu_io_patterns_unaligned_zeroes_and_discard() {
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("qemu-io");
    let mut rng = Rng::new(seed("qemu-io"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let server = Server::start(&dir, &[export(&dir, "d", &key, ",size=64M,discards")]);
    let script = [
        // Aligned and unaligned pattern writes; 1000+3000 straddles a sector boundary, and
        // 4000+8300 straddles three 4 KiB sectors.
        "write -P 0x11 0 4096",
        "write -P 0x22 1000 3000",
        "write -P 0x33 4000 8300",
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x33 4000 8300",
        "read -P 0 12300 4084",
        // Zeroes read back as zeroes, with and without permission to punch holes.
        "write -P 0x44 1M 1M",
        "write -z 1M 64k",
        "read -P 0 1M 64k",
        "write -z -u 1200k 12345",
        "read -P 0 1200k 12345",
        "read -P 0x44 1088k 112k",
        // Discard on a discards volume, then the range reads as zeroes.
        "write -P 0x55 8M 1M",
        "discard 8M 512k",
        "read -P 0 8M 512k",
        "read -P 0x55 8704k 512k",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in script {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(server.uri("d"));
    let out = run_ok(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert_eq!(out.matches("\nread ").count(), 9, "{out}");
}

#[test]
fn nbdinfo_reports_size_flags_block_sizes_and_lists_exports() {
    if !peer_available("nbdinfo", have("nbdinfo")) {
        return;
    }
    let dir = TempDir::new("nbdinfo");
    let mut rng = Rng::new(seed("nbdinfo"));
    let (k1, _) = key_file(&dir, "k1", &mut rng);
    let (k2, _) = key_file(&dir, "k2", &mut rng);
    // A read-only export needs an existing backing file.
    std::fs::File::create(dir.path("small.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let server = Server::start(
        &dir,
        &[
            export(
                &dir,
                "scratch",
                &k1,
                ",size=64M,discards,description=scratch volume",
            ),
            export(&dir, "small", &k2, ",size=1M,sector-size=512,read-only"),
        ],
    );
    let json = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(server.uri("scratch")),
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(64 << 20), "{json}");
    // Any alignment is accepted (read-modify-write at the edges); the sector size is preferred.
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{json}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{json}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(64 << 20), "{json}");
    assert_eq!(e["can_cache"].as_bool(), Some(true), "{json}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[flag].as_bool(), Some(true), "{flag}: {json}");
    }
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{json}");
    assert_eq!(e["description"].as_str(), Some("scratch volume"), "{json}");

    let json = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(server.uri("small")),
    );
    let v = serde_json::from_str::<serde_json::Value>(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{json}");
    assert_eq!(e["can_trim"].as_bool(), Some(false), "{json}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{json}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(512), "{json}");

    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(format!("nbd://{}", server.addr)),
    );
    let v = serde_json::from_str::<serde_json::Value>(&list).unwrap();
    let names: Vec<&str> = (0..2)
        .filter_map(|i| v["exports"][i]["export-name"].as_str())
        .collect();
    assert_eq!(names, vec!["scratch", "small"], "{list}");
}

#[test]
fn nbdcopy_256_mib_in_and_out_with_one_and_four_connections() {
    if !peer_available("nbdcopy", have("nbdcopy")) {
        return;
    }
    let dir = TempDir::new("nbdcopy");
    let mut rng = Rng::new(seed("nbdcopy"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let server = Server::start(&dir, &[export(&dir, "d", &key, ",size=256M")]);
    let src = dir.path("src.bin");
    std::fs::write(&src, rng.bytes(256 << 20)).unwrap();
    for conns in ["1", "4"] {
        run_ok(
            Command::new("nbdcopy")
                .args(["--connections", conns])
                .arg(&src)
                .arg(server.uri("d")),
        );
        let out = dir.path(&format!("out-{conns}.bin"));
        std::fs::File::create(&out)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        run_ok(
            Command::new("nbdcopy")
                .args(["--connections", conns])
                .arg(server.uri("d"))
                .arg(&out),
        );
        run_ok(Command::new("cmp").arg(&src).arg(&out));
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn fio_randrw_verify_512_and_4k_blocks_has_no_errors() {
    if !peer_available("fio", have("fio")) {
        return;
    }
    let dir = TempDir::new("fio");
    let mut rng = Rng::new(seed("fio"));
    let (k1, _) = key_file(&dir, "k1", &mut rng);
    let (k2, _) = key_file(&dir, "k2", &mut rng);
    // libnbd honours the advertised minimum block size, so 512-byte I/O goes to a volume with
    // 512-byte sectors and 4 KiB I/O to one with 4 KiB sectors.
    let server = Server::start(
        &dir,
        &[
            export(&dir, "s512", &k1, ",size=64M,sector-size=512"),
            export(&dir, "s4k", &k2, ",size=64M"),
        ],
    );
    for (bs, name) in [("512", "s512"), ("4k", "s4k")] {
        let out = run_ok(
            Command::new("fio")
                .current_dir(&dir.0)
                .args([
                    "--name=verify",
                    "--verify_state_save=0",
                    "--ioengine=nbd",
                    "--rw=randrw",
                    "--iodepth=32",
                    "--numjobs=4",
                ])
                .arg(format!("--uri={}", server.uri(name)))
                .arg(format!("--bs={bs}"))
                .args([
                    "--size=4M",
                    "--offset_increment=16M",
                    "--verify=crc32c",
                    "--do_verify=1",
                ])
                .args([
                    "--verify_fatal=1",
                    "--group_reporting",
                    "--output-format=json",
                ]),
        );
        let v = serde_json::from_str::<serde_json::Value>(&out[out.find('{').unwrap()..]).unwrap();
        let job = &v["jobs"][0];
        assert_eq!(job["error"].as_u64(), Some(0), "bs={bs}: {out}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "bs={bs}: {out}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "bs={bs}: {out}"
        );
    }
}

#[test]
fn backing_file_decrypts_with_python_cryptography_and_holds_no_plaintext() {
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let oracle_ok = Command::new(python())
        .args(["-c", "import cryptography"])
        .status()
        .map_err(|e| e.to_string())
        .and_then(|s| {
            if s.success() {
                Ok(())
            } else {
                Err("no cryptography module".into())
            }
        });
    if !peer_available("python cryptography", oracle_ok) {
        return;
    }
    let dir = TempDir::new("oracle");
    let mut rng = Rng::new(seed("oracle"));
    for (sector, tag) in [(4096usize, "s4k"), (512, "s512")] {
        let (key, raw) = key_file(&dir, &format!("k-{tag}"), &mut rng);
        let server = Server::start(
            &dir,
            &[export(
                &dir,
                tag,
                &key,
                &format!(",size=16M,sector-size={sector}"),
            )],
        );
        // A recognisable plaintext: a repeated 64-byte phrase, written unaligned.
        let phrase: Vec<u8> =
            b"nbdcrypt known plaintext that must never reach the disk! 0123456"[..64].to_vec();
        let pattern: Vec<u8> = phrase.iter().copied().cycle().take(300_000).collect();
        let src = dir.path("pattern.bin");
        std::fs::write(&src, &pattern).unwrap();
        let offset = 123_457u64;
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c"])
                .arg(format!(
                    "write -s {} {offset} {}",
                    src.display(),
                    pattern.len()
                ))
                .arg(server.uri(tag)),
        );
        drop(server.stop());
        let img = dir.path(&format!("{tag}.img"));
        let plain = common::volumes::oracle_decrypt(
            &img,
            &hex::encode(raw),
            sector,
            0,
            offset - 5000,
            pattern.len() + 10_000,
        );
        assert!(
            plain[..5000].iter().all(|&b| b == 0),
            "{tag}: bytes before the write"
        );
        assert!(
            plain[5000..5000 + pattern.len()] == pattern[..],
            "{tag}: decrypted plaintext differs"
        );
        assert!(
            plain[5000 + pattern.len()..].iter().all(|&b| b == 0),
            "{tag}: bytes after the write"
        );
        let disk = std::fs::read(&img).unwrap();
        for window in [&phrase[..16], &phrase[20..36], &phrase[40..56]] {
            assert!(
                !disk.windows(16).any(|w| w == window),
                "{tag}: plaintext found in the backing file"
            );
        }
    }
}
