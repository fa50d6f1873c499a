//! Helpers shared by the integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use nbdcrypt::crypto::VolumeKey;

mod artifacts;
pub mod ext4;
pub mod kernel;
pub mod moto;
pub mod nbdkit;
pub mod nodes;
pub mod prometheus;
mod raw;
mod sys;
pub mod tls;
pub mod volumes;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use kernel::LoopDev;
#[allow(unused_imports)]
pub use raw::*;
#[allow(unused_imports)]
pub use sys::*;

/// `NBDCRYPT_SKIP_MISSING_PEERS=1`: a contributor without the peers skips their tests,
/// explicitly. Otherwise (the default, and what scripts/test.sh and CI run) a missing peer is
/// a failure: a plain `cargo test` never passes by skipping. (`NBDCRYPT_REQUIRE_PEERS=1`, the
/// old switch, is the default now and still accepted.)
pub fn skipping_allowed() -> bool {
    std::env::var("NBDCRYPT_SKIP_MISSING_PEERS").is_ok_and(|v| v == "1")
        && !std::env::var("NBDCRYPT_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Where skipped peers are listed for the end of the run (`scripts/test.sh --quick` prints it).
pub fn skipped_list() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-peers.txt")
}

/// Decides what to do about a missing peer: fail (the default), or with
/// `NBDCRYPT_SKIP_MISSING_PEERS=1` say so where it cannot be missed (straight to stderr, past
/// the test harness's capture), add it to [`skipped_list`], and return `false`.
pub fn peer_available(name: &str, available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if !skipping_allowed() => panic!(
            "peer `{name}` is unavailable: {why}. Install the peers (scripts/test.sh does), or \
             set NBDCRYPT_SKIP_MISSING_PEERS=1 to skip such tests knowingly"
        ),
        Err(why) => {
            use std::io::Write as _;
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let line = format!("SKIPPED {test}: peer `{name}` unavailable ({why})\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(skipped_list())
            {
                let _ = f.write_all(line.as_bytes());
            }
            false
        }
    }
}

/// The Python interpreter of the test venv (`NBDCRYPT_PYTHON`), or `python3`.
pub fn python() -> String {
    std::env::var("NBDCRYPT_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A deterministic xorshift generator, so failures reproduce from the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A random key with distinct halves, and a copy of its bytes for the reference implementations.
pub fn random_key(rng: &mut Rng) -> (VolumeKey, [u8; 64]) {
    let mut raw = [0u8; 64];
    rng.fill(&mut raw);
    let copy = raw;
    (
        VolumeKey::take_from(&mut raw).expect("random halves differ"),
        copy,
    )
}

/// A seed from the environment (`NBDCRYPT_TEST_SEED`) or the clock; printed so a failure can be
/// replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("NBDCRYPT_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                .unwrap_or(42)
        });
    eprintln!("{test}: NBDCRYPT_TEST_SEED={s}");
    s
}

/// A scratch directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base =
            std::env::var_os("NBDCRYPT_TEST_TMP").map_or_else(std::env::temp_dir, Into::into);
        let p = base.join(format!(
            "nbdcrypt-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        artifacts::harvest_for_secret_audit(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether a command exists on PATH (runs `NAME --version` or `--help`).
pub fn have(cmd: &str) -> Result<(), String> {
    for arg in ["--version", "--help", "-V"] {
        if let Ok(out) = std::process::Command::new(cmd).arg(arg).output()
            && (out.status.success() || !out.stdout.is_empty())
        {
            return Ok(());
        }
    }
    Err(format!("`{cmd}` not found on PATH"))
}

/// A running `nbdcrypt serve`, stopped with SIGTERM (graceful) on drop.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::path::PathBuf,
}

impl Server {
    /// Starts the server with the given `--export` specs on a free loopback port.
    pub fn start(dir: &TempDir, exports: &[String]) -> Server {
        Self::start_with(dir, exports, &[])
    }

    pub fn start_with(dir: &TempDir, exports: &[String], extra: &[&str]) -> Server {
        Self::try_start(dir, exports, extra, &[])
            .unwrap_or_else(|log| panic!("server exited early:\n{log}"))
    }

    /// Starts the server; `Err(log)` if it exits before becoming ready.
    pub fn try_start(
        dir: &TempDir,
        exports: &[String],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        Self::try_start_wrapped(dir, exports, extra, env, &[])
    }

    /// [`Server::try_start`] through a wrapper command (e.g. `setpriv --reuid=…`), which must
    /// exec the server so that the child's pid is the server's.
    pub fn try_start_wrapped(
        dir: &TempDir,
        exports: &[String],
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Result<Server, String> {
        let ready = dir.path(&format!("ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let log = dir.path("server.log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_nbdcrypt"));
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_nbdcrypt")),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready);
        for e in exports {
            cmd.arg("--export").arg(e);
        }
        cmd.args(extra);
        cmd.env("NBDCRYPT_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stderr(logf).stdout(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("start nbdcrypt serve");
        let start = std::time::Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready)
                && s.ends_with('\n')
            {
                let addr = s.trim().trim_start_matches("nbd://").to_owned();
                return Ok(Server { child, addr, log });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "({status}) {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if start.elapsed().as_secs() >= 30 {
                // Never leave the server behind (it would also hold the test's output pipe).
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not become ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// The log once it contains `needle`, or after 10 s without it (the caller asserts).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(needle) || start.elapsed().as_secs() > 10 {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait; returns the log.
    pub fn stop(mut self) -> String {
        self.terminate();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let start = std::time::Instant::now();
            while start.elapsed().as_secs() < 20 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Writes a random key file and returns its path and bytes.
pub fn key_file(dir: &TempDir, name: &str, rng: &mut Rng) -> (std::path::PathBuf, [u8; 64]) {
    let mut k = [0u8; 64];
    rng.fill(&mut k);
    let p = dir.path(name);
    std::fs::write(&p, k).unwrap();
    (p, k)
}

/// An `--export` spec for `DIR/NAME.img` with the key file `key` and extra options (`,size=…`).
pub fn export_spec(dir: &TempDir, name: &str, key: &std::path::Path, extra: &str) -> String {
    format!(
        "name={name},file={},key-file={}{extra}",
        dir.path(&format!("{name}.img")).display(),
        key.display()
    )
}

/// [`export_spec`] with a fresh random key file `DIR/NAME.key` (seeded by the export name).
pub fn keyed_export(dir: &TempDir, name: &str, extra: &str) -> String {
    let mut rng = Rng::new(seed(name));
    let (key, _) = key_file(dir, &format!("{name}.key"), &mut rng);
    export_spec(dir, name, &key, extra)
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Requests counted in the server's "connection closed" lines for one placement (`inline`,
/// `workers`, `blocking`).
pub fn placed(log: &str, place: &str) -> u64 {
    let key = format!(" {place}=");
    log.lines()
        .filter(|l| l.contains("connection closed"))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// An encrypted volume over `storage` with a fixed test key (not a secret: both sides of a
/// comparison, or a fuzz-like test, need the same key).
pub fn test_volume(
    storage: Box<dyn nbdcrypt::storage::Storage>,
    size: u64,
    sector_bytes: u64,
) -> nbdcrypt::volume::EncryptedVolume {
    use nbdcrypt::crypto::{BackendChoice, SectorSize, XtsEngine};
    let mut raw: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(7))
        .collect();
    let key = VolumeKey::take_from(&mut raw).unwrap();
    let sector = SectorSize::from_bytes(sector_bytes).unwrap();
    let engine = XtsEngine::new(&key, sector, BackendChoice::Auto).unwrap();
    let config = nbdcrypt::volume::VolumeConfig {
        size,
        sector_size: sector,
        discards: false,
        read_only: false,
        data_offset: 0,
    };
    nbdcrypt::volume::EncryptedVolume::new(storage, engine, config).unwrap()
}

/// `nbdcrypt` with the given state directory and the default log level.
pub fn nbdcrypt_cli(state: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env("NBDCRYPT_STATE_DIR", state)
        .env_remove("NBDCRYPT_LOG");
    c
}
