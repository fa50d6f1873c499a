//! A persistent volume that moves between two "nodes" (two state directories, two node names,
//! one shared KMS: moto), with its bytes on an upstream NBD export: written on A, imported on
//! B, refused on B while A serves it (naming A), taken over by B once A stops, and by A again
//! once B dies and its lease goes stale. Run against whatever upstream the caller started.

use std::time::Duration;

use super::moto::{AWS_ENV, Moto, aws_cli};
use super::{Server, TempDir, raw_connect, raw_flush, raw_read, raw_write, run_ok};

/// One node: its own state directory and node name, the shared KMS.
struct Node<'a> {
    dir: TempDir,
    name: &'static str,
    moto: &'a Moto,
}

impl Node<'_> {
    fn state(&self) -> std::path::PathBuf {
        self.dir.path("state")
    }

    fn cli(&self) -> std::process::Command {
        let mut c = aws_cli(&self.state(), &self.moto.url);
        c.env("NBDCRYPT_NODE_NAME", self.name);
        c
    }

    fn serve(&self, volume: &str) -> Result<Server, String> {
        let state = self.state().to_str().unwrap().to_owned();
        let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
        env.push(("NBDCRYPT_STATE_DIR", &state));
        env.push(("NBDCRYPT_KMS", "aws"));
        env.push(("NBDCRYPT_KMS_ENDPOINT", &self.moto.url));
        env.push(("NBDCRYPT_NODE_NAME", self.name));
        Server::try_start(
            &self.dir,
            &[],
            &["--volume", volume, "--lease-interval", "1"],
            &env,
        )
    }
}

/// The scenario, on the upstream export `uri` (at least 40 MiB, zeroed).
pub fn volume_moves_between_nodes(uri: &str, moto: &Moto) {
    let a = Node {
        dir: TempDir::new("node-a"),
        name: "node-a",
        moto,
    };
    let b = Node {
        dir: TempDir::new("node-b"),
        name: "node-b",
        moto,
    };
    run_ok(a.cli().args([
        "volume",
        "create",
        "pv",
        "--type",
        "persistent",
        "--size",
        "32M",
        "--backing",
        uri,
    ]));
    let mut rng = super::Rng::new(super::seed("volume moves between nodes"));
    let data = rng.bytes(1 << 20);
    let on_a = a
        .serve("pv")
        .unwrap_or_else(|log| panic!("node A cannot serve:\n{log}"));
    let mut s = raw_connect(&on_a.addr, "pv");
    raw_write(&mut s, 1, 5 << 20, &data, 0);
    raw_flush(&mut s, 2);
    drop(s);

    // B adopts the volume from its header in the export (one Decrypt through the shared KMS)…
    let out = run_ok(b.cli().args(["volume", "import", "pv", "--backing", uri]));
    assert!(out.contains("pv"), "{out}");
    // …but cannot serve it while A does: refused, naming A.
    match b.serve("pv") {
        Ok(server) => {
            let log = server.stop();
            panic!("node B served a volume that node A holds:\n{log}");
        }
        Err(log) => assert!(
            log.contains("node-a") && log.contains("being served"),
            "the refusal does not name node A:\n{log}"
        ),
    }
    // Nor delete it.
    let del = b.cli().args(["volume", "delete", "pv"]).output().unwrap();
    assert!(!del.status.success());
    assert!(String::from_utf8_lossy(&del.stderr).contains("node-a"));

    // A stops (its lease is released): B takes over and reads what A wrote.
    let log = on_a.stop();
    assert!(log.contains("lease released"), "{log}");
    let on_b = b
        .serve("pv")
        .unwrap_or_else(|log| panic!("node B cannot take over:\n{log}"));
    let mut s = raw_connect(&on_b.addr, "pv");
    assert!(
        raw_read(&mut s, 3, 5 << 20, 1 << 20) == data,
        "node B reads other bytes"
    );
    drop(s);

    // B dies without releasing: A is refused while B's lease is fresh, then takes it over
    // once it is stale (no heartbeat for three 1 s intervals).
    let mut on_b = on_b;
    on_b.child.kill().unwrap();
    on_b.child.wait().unwrap();
    let started = std::time::Instant::now();
    let refused = a.serve("pv");
    let took_over = match refused {
        Ok(server) if started.elapsed() < Duration::from_secs(2) => {
            let log = server.stop();
            panic!("node A took a fresh lease of node B at once:\n{log}");
        }
        Ok(server) => server,
        Err(log) => {
            assert!(log.contains("node-b"), "{log}");
            std::thread::sleep(Duration::from_secs(4));
            a.serve("pv")
                .unwrap_or_else(|log| panic!("node A cannot take a stale lease over:\n{log}"))
        }
    };
    let mut s = raw_connect(&took_over.addr, "pv");
    assert!(raw_read(&mut s, 4, 5 << 20, 1 << 20) == data);
    drop(s);
    let log = took_over.stop();
    assert!(log.contains("taking over a stale lease"), "{log}");
}
