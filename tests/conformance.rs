//! Protocol conformance next to the reference: the same probes (`scripts/nbd_probe.py`, a raw
//! socket client and libnbd call by call) against nbdcrypt and against `nbdkit memory`, and
//! their answers compared where the spec leaves one right answer: zero-length `READ` and
//! `CACHE` (EINVAL; the connection lives on, also for libnbd, which kills a connection on a
//! too-short data chunk), `CACHE` advertised and served, `TRIM` and `WRITE` on a read-only
//! export (EPERM), reads past the end (EINVAL), a 50 MB write and read (clients that ignore
//! block sizes send such), and the advertised block sizes (minimum 1, preferred = sector size,
//! maximum 64 MiB or `--max-request-mib`).
//! Peers: nbdkit, python3-libnbd (Debian's python3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{Server, TempDir, free_port, have, keyed_export, peer_available, run_ok};
use serde_json::Value;

/// Debian's python3, which has python3-libnbd (a venv or pyenv python does not).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn prerequisites() -> Result<(), String> {
    have("nbdkit")?;
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err("python3-libnbd (`import nbd` in /usr/bin/python3) is missing".into())
    }
}

fn probe(args: &[&str]) -> Value {
    let out = run_ok(
        Command::new(SYSTEM_PYTHON)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nbd_probe.py"))
            .args(args)
            .stderr(Stdio::null()),
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `nbdkit memory` on a loopback port, killed on drop.
struct Nbdkit {
    child: Child,
    port: u16,
}

impl Nbdkit {
    fn start(read_only: bool) -> Nbdkit {
        let port = free_port();
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        if read_only {
            c.arg("-r");
        }
        let child = c
            .args(["memory", "128M"])
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed().as_secs() < 10, "nbdkit did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Nbdkit { child, port }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answers of both servers must agree on every key but the ones listed.
fn assert_agree(ours: &Value, theirs: &Value, skip: &[&str]) {
    for (k, v) in theirs.as_object().unwrap() {
        if skip.iter().any(|s| k.contains(s)) {
            continue;
        }
        assert_eq!(
            ours.get(k),
            Some(v),
            "{k}: nbdcrypt {ours} vs nbdkit {theirs}"
        );
    }
}

#[test]
fn conformance_raw_and_libnbd_answers_match_nbdkit() {
    if !peer_available("nbdkit + python3-libnbd", prerequisites()) {
        return;
    }
    let dir = TempDir::new("conformance");
    let server = Server::start(&dir, &[keyed_export(&dir, "d", ",size=128M,discards")]);
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let kit = Nbdkit::start(false);
    let kit_port = kit.port.to_string();

    // Raw client, simple and structured replies.
    let ours = probe(&["raw", host, port, "d"]);
    let theirs = probe(&["raw", "127.0.0.1", &kit_port, ""]);
    // nbdkit memory sends no block-size information; everything else must agree.
    assert_agree(&ours, &theirs, &["info"]);
    for mode in ["simple", "structured"] {
        assert_eq!(ours[format!("{mode}.read0")]["errno"], 22, "{ours}");
        assert_eq!(ours[format!("{mode}.read0")]["alive"], true, "{ours}");
        assert_eq!(ours[format!("{mode}.cache")]["errno"], 0, "{ours}");
        assert_eq!(
            ours[format!("{mode}.info")]["block"],
            serde_json::json!([1, 4096, 64 << 20]),
            "{ours}"
        );
        // SEND_CACHE (bit 10) is advertised.
        let flags = ours[format!("{mode}.info")]["flags"].as_u64().unwrap();
        assert_ne!(flags & (1 << 10), 0, "{ours}");
    }

    // libnbd call by call.
    let ours = probe(&["libnbd", &server.uri("d")]);
    let theirs = probe(&["libnbd", &format!("nbd://127.0.0.1:{kit_port}")]);
    assert_agree(&ours, &theirs, &["block"]);
    assert_eq!(ours["read0"], "EINVAL", "{ours}");
    assert_eq!(ours["alive_after_read0"], true, "{ours}");
    assert_eq!(ours["big"], true, "{ours}");
    assert_eq!(ours["cache"], "ok", "{ours}");
    assert_eq!(
        ours["block"],
        serde_json::json!([1, 4096, 64 << 20]),
        "{ours}"
    );
}

#[test]
fn conformance_read_only_export_answers_eperm_like_nbdkit() {
    if !peer_available("nbdkit + python3-libnbd", prerequisites()) {
        return;
    }
    let dir = TempDir::new("conformance-ro");
    let img = dir.path("r.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (key, _) = common::key_file(&dir, "k", &mut common::Rng::new(3));
    let spec = format!(
        "name=r,file={},key-file={},read-only,discards",
        img.display(),
        key.display()
    );
    let server = Server::start(&dir, &[spec]);
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let kit = Nbdkit::start(true);
    let ours = probe(&["raw-readonly", host, port, "r"]);
    let theirs = probe(&["raw-readonly", "127.0.0.1", &kit.port.to_string(), ""]);
    assert_agree(&ours, &theirs, &[]);
    assert_eq!(ours["readonly.trim"]["errno"], 1, "{ours}");
    let ours = probe(&["libnbd-readonly", &server.uri("r")]);
    let theirs = probe(&["libnbd-readonly", &format!("nbd://127.0.0.1:{}", kit.port)]);
    assert_eq!(ours, theirs);
    assert_eq!(ours["trim"], "EPERM", "{ours}");
}

#[test]
fn conformance_max_request_is_configurable_and_advertised() {
    if !peer_available("python3-libnbd", prerequisites()) {
        return;
    }
    let dir = TempDir::new("conformance-max");
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=16M")],
        &["--max-request-mib", "1"],
    );
    let ours = probe(&["libnbd", &server.uri("d")]);
    assert_eq!(
        ours["block"],
        serde_json::json!([1, 4096, 1 << 20]),
        "{ours}"
    );
}
