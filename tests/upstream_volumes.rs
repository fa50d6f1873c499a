//! Managed volumes whose bytes live in an upstream NBD export (nbdkit here; Ceph RBD in
//! tests/ceph.rs): the header in the export, the size taken from it, one volume per export,
//! the lease refusing a delete under a server, crypto-shredding in the export, and a
//! persistent volume moving between two nodes that share a KMS (moto).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::nbdkit::Nbdkit;
use common::{Rng, TempDir, have, peer_available, run_ok, seed};
use nbdcrypt::storage::Storage;
use nbdcrypt::upstream::NbdStore;

fn available() -> bool {
    peer_available("nbdkit", have("nbdkit"))
}

/// A persistent volume whose bytes live in nbdkit moves between two nodes sharing a KMS
/// (moto): see `common::nodes`.
#[test]
fn a_persistent_volume_moves_between_nodes_on_an_nbdkit_upstream() {
    if !available() {
        return;
    }
    let Some(moto) = common::moto::moto() else {
        return;
    };
    let dir = TempDir::new("upstream-nodes");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "64M"]);
    common::nodes::volume_moves_between_nodes(&kit.uri(""), &moto);
}

/// A managed volume on an nbdkit export (local KMS): without `--size` it takes the export less
/// the 1 MiB header area; a second volume on the same export is refused; `volume delete` while
/// it is served is refused (no lock exists on an NBD export: the fresh lease refuses it), and
/// after the server stops it shreds the header in the export and leaves the ciphertext. On
/// the way, `volume reencrypt` re-keys it in the export and `volume resize` says that the
/// export must be grown by its owner.
#[test]
fn a_managed_volume_lives_in_the_export_with_its_header() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-managed");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "64M"]);
    let state = dir.path("state");
    let cli = || common::nbdcrypt_cli(&state);
    let uri = kit.uri("");
    let out = run_ok(cli().args(["volume", "create", "v", "--backing", &uri]));
    assert!(out.contains("63 MiB"), "{out}");
    let second = cli()
        .args(["volume", "create", "w", "--size", "8M", "--backing", &uri])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("backing store of volume v"),
        "{second:?}"
    );
    let server = common::volumes::serve(&dir, &state, &["--volume", "v"]).unwrap();
    let mut rng = Rng::new(seed("upstream managed"));
    let data = rng.bytes(256 << 10);
    let mut s = common::raw_connect(&server.addr, "v");
    common::raw_write(&mut s, 1, 0, &data, 0);
    common::raw_flush(&mut s, 2);
    assert!(common::raw_read(&mut s, 3, 0, 256 << 10) == data);
    drop(s);
    let busy = cli().args(["volume", "delete", "v"]).output().unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("being served"),
        "{busy:?}"
    );
    server.stop();
    // Re-keying works on an export too (reads and writes, no mapping): the ciphertext in the
    // export changes, the data does not.
    let ciphertext = |at: u64| {
        let mut b = vec![0u8; 256 << 10];
        NbdStore::open(&uri).unwrap().read_at(&mut b, at).unwrap();
        b
    };
    let before = ciphertext(1 << 20);
    let out = run_ok(cli().args(["volume", "reencrypt", "v", "--json"]));
    assert!(out.contains("\"event\":\"done\""), "{out}");
    assert!(
        ciphertext(1 << 20) != before,
        "the ciphertext did not change"
    );
    let server = common::volumes::serve(&dir, &state, &["--volume", "v"]).unwrap();
    let mut s = common::raw_connect(&server.addr, "v");
    assert!(
        common::raw_read(&mut s, 1, 0, 256 << 10) == data,
        "data changed by reencrypt"
    );
    drop(s);
    server.stop();
    // An export cannot be grown by nbdcrypt: resize says who must grow it.
    let grow = cli()
        .args(["volume", "resize", "v", "--size", "128M"])
        .output()
        .unwrap();
    assert!(!grow.status.success());
    assert!(
        String::from_utf8_lossy(&grow.stderr).contains("cannot be grown by nbdcrypt"),
        "{grow:?}"
    );
    let out = run_ok(cli().args(["volume", "delete", "v"]));
    assert!(out.contains("stays in the upstream export"), "{out}");
    // The header in the export says deleted and holds no wrapped key; the data area is
    // ciphertext that nobody can decrypt any more.
    let raw = NbdStore::open(&uri).unwrap();
    let mut head = vec![0u8; 1 << 20];
    raw.read_at(&mut head, 0).unwrap();
    match nbdcrypt::volume::probe::examine(&head, &[]) {
        nbdcrypt::volume::probe::Found::Nbdcrypt { deleted, .. } => assert!(deleted),
        other => panic!("the export holds {other}"),
    }
    let mut first = vec![0u8; 256 << 10];
    raw.read_at(&mut first, 1 << 20).unwrap();
    assert!(first != data && first.iter().any(|&b| b != 0));
}
