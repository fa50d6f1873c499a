//! The `nbdcrypt` command line against a state directory, as the operator-mistake tests
//! drive it (tests/mistakes.rs, tests/mistakes_serving.rs).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{Server, TempDir, nbdcrypt_cli, raw_connect, raw_flush, raw_read, raw_write};

pub fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Runs the CLI; returns (success, stdout, stderr).
pub fn cli(state: &Path, args: &[&str]) -> (bool, String, String) {
    let out: Output = nbdcrypt_cli(state).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn cli_ok(state: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(state, args);
    assert!(ok, "nbdcrypt {args:?} failed:\n{out}\n{err}");
    out
}

pub fn cli_err(state: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(state, args);
    assert!(!ok, "nbdcrypt {args:?} should have failed:\n{out}\n{err}");
    err
}

/// `volume create NAME --size SIZE --backing PATH [EXTRA…]`.
pub fn create_on(
    state: &Path,
    name: &str,
    size: &str,
    backing: &Path,
    extra: &[&str],
) -> (bool, String, String) {
    let mut args = vec!["volume", "create", name, "--size", size, "--backing"];
    args.push(backing.to_str().unwrap());
    args.extend_from_slice(extra);
    cli(state, &args)
}

/// `volume list --json` as (name, state) pairs.
pub fn listed(state: &Path) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(state, &["volume", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn serve(dir: &TempDir, state: &Path, extra: &[&str]) -> Result<Server, String> {
    Server::try_start(
        dir,
        &[],
        extra,
        &[("NBDCRYPT_STATE_DIR", state.to_str().unwrap())],
    )
}

/// Writes `data` at 0 through a fresh connection, flushed.
pub fn write_through(server: &Server, export: &str, data: &[u8]) {
    let mut s = raw_connect(&server.addr, export);
    raw_write(&mut s, 1, 0, data, 0);
    raw_flush(&mut s, 2);
}

pub fn read_through(server: &Server, export: &str, len: u32) -> Vec<u8> {
    let mut s = raw_connect(&server.addr, export);
    raw_read(&mut s, 1, 0, len)
}

/// Waits until `f` holds or `limit` passes; returns the time taken.
pub fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The connection is cut: a request gets an error reply or the socket closes.
pub fn cut_off(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = super::raw_request(nbdcrypt::protocol::consts::cmd::READ, 77, 0, 4096);
    if s.write_all(&req).is_err() {
        return true;
    }
    let mut h = [0u8; 16];
    match s.read_exact(&mut h) {
        Err(_) => true,
        Ok(()) => h[4..8] != [0; 4],
    }
}

/// Decrypts plaintext bytes `start..start+len` (volume coordinates) of the backing file `file`
/// with scripts/volume_oracle.py (pyca/cryptography, never nbdcrypt code).
pub fn oracle_decrypt(
    file: &Path,
    key_hex: &str,
    sector: usize,
    data_offset: u64,
    start: u64,
    len: usize,
) -> Vec<u8> {
    let out = std::process::Command::new(super::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/volume_oracle.py"
        ))
        .arg(file)
        .arg(key_hex)
        .args([
            sector.to_string(),
            data_offset.to_string(),
            start.to_string(),
            len.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// fio `randrw` with `verify=crc32c` against the NBD `uri`: `jobs` jobs × QD16, requests of
/// `bs_min`–1 MiB aligned to `bs_min`, each job on its own `size_mib` MiB. Fails the test on
/// any fio error; returns the (group-reported) job's JSON.
pub fn fio_verify_randrw(
    dir: &TempDir,
    uri: &str,
    jobs: u32,
    size_mib: u32,
    bs_min: &str,
) -> serde_json::Value {
    // fio writes its verify state into the current directory: keep it in the test's own.
    let out = super::run_ok(
        std::process::Command::new("fio")
            .current_dir(&dir.0)
            .args([
                "--name=verify",
                "--verify_state_save=0",
                "--ioengine=nbd",
                "--rw=randrw",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
                "--output-format=json",
            ])
            .arg(format!("--numjobs={jobs}"))
            .arg(format!("--bsrange={bs_min}-1m"))
            .arg(format!("--blockalign={bs_min}"))
            .arg(format!("--size={size_mib}M"))
            .arg(format!("--offset_increment={size_mib}M"))
            .arg(format!("--uri={uri}")),
    );
    let v = serde_json::from_str::<serde_json::Value>(&out[out.find('{').unwrap()..]).unwrap();
    let job = v["jobs"][0].clone();
    assert_eq!(job["error"].as_u64(), Some(0), "{out}");
    job
}
