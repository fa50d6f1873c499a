//! Kernel objects a test attaches (loop devices, nbdfuse mounts), torn down so that a busy
//! device can never hang the run. Why this exists: `losetup -d` on a loop device that something
//! still holds open (udev probing it after an unmount, say) only marks it for detach on last
//! close, so the FUSE file under it stays busy for a moment; a single `fusermount3 -u` then
//! fails with "Device or resource busy", nbdfuse never exits, and waiting for it hung a CI run
//! until its time limit. Here each step waits for the kernel to finish the previous one,
//! retries within a deadline, and then forces (SIGTERM to nbdfuse, which unmounts lazily;
//! SIGKILL), and a watchdog kills nbdfuse if a mounted test overruns, so that blocked I/O ends
//! with errors and the test fails instead of hanging.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::run_ok;
use super::volumes::within;

/// Whether `done` holds within `limit` (polled).
fn wait_until(limit: Duration, done: impl FnMut() -> bool) -> bool {
    within(limit, done).is_some()
}

/// A loop device over a file (root only), detached on drop and waited for.
pub struct LoopDev(pub String);

impl LoopDev {
    /// Attaches `file` to the first free loop device, with extra `losetup` options.
    pub fn attach_with(file: &Path, opts: &[&str]) -> LoopDev {
        let out = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(opts)
                .arg(file),
        );
        LoopDev(out.trim().to_owned())
    }

    /// Attaches `file` with the loop driver's defaults (512-byte logical blocks).
    pub fn attach(file: &Path) -> LoopDev {
        Self::attach_with(file, &[])
    }

    /// Whether the kernel still has a backing file on this device.
    fn attached(&self) -> bool {
        let name = Path::new(&self.0).file_name().unwrap_or_default();
        Path::new("/sys/block")
            .join(name)
            .join("loop/backing_file")
            .exists()
    }

    /// Detaches and waits (up to 20 s) until the kernel has let go of the backing file; a
    /// device that is still open somewhere is detached on its last close.
    pub fn detach(&self) -> bool {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        wait_until(Duration::from_secs(20), || !self.attached())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.attached() && !self.detach() {
            eprintln!("loop device {} is still attached after 20 s", self.0);
        }
    }
}

/// A mounted file system, unmounted on drop (retried while the kernel reports it busy).
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn new(device: &str, dir: &Path) -> Mount {
        run_ok(Command::new("mount").arg(device).arg(dir));
        Mount(dir.to_owned())
    }

    /// Unmounts, retrying for up to 20 s while the kernel reports the file system busy.
    pub fn unmount(mut self) -> bool {
        self.try_unmount()
    }

    fn try_unmount(&mut self) -> bool {
        let dir = std::mem::take(&mut self.0);
        dir.as_os_str().is_empty()
            || wait_until(Duration::from_secs(20), || {
                Command::new("umount")
                    .arg(&dir)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let dir = self.0.clone();
        if !self.try_unmount() {
            eprintln!("{} is still mounted after 20 s", dir.display());
        }
    }
}

/// The export `uri` as the file `dir/disk`, served by nbdfuse.
pub struct Fuse {
    child: Option<Child>,
    pub dir: PathBuf,
    cancel: Option<mpsc::Sender<()>>,
}

impl Fuse {
    /// Mounts, and arms a watchdog: if the mount is still up after `limit`, nbdfuse is
    /// killed, which fails every pending and later I/O on it (the test then fails, not hangs).
    pub fn mount(dir: &Path, uri: &str, limit: Duration) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new("nbdfuse")
            .arg(dir.join("disk"))
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let pid = child.id();
        let (cancel, cancelled) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                eprintln!(
                    "watchdog: nbdfuse (pid {pid}) still mounted after {limit:?}; killing it"
                );
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        });
        let fuse = Fuse {
            child: Some(child),
            dir: dir.to_owned(),
            cancel: Some(cancel),
        };
        assert!(
            wait_until(Duration::from_secs(20), || dir.join("disk").exists()),
            "nbdfuse did not come up"
        );
        fuse
    }

    /// Unmounts and waits for nbdfuse to exit. Returns an error when that took force (the
    /// mount stayed busy for 20 s, or nbdfuse did not exit): a test calls this and asserts.
    pub fn unmount(mut self) -> Result<(), String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
        let mut problem = None;
        let unmounted = wait_until(Duration::from_secs(20), || {
            child.try_wait().ok().flatten().is_some()
                || Command::new("fusermount3")
                    .arg("-u")
                    .arg(&self.dir)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        if !unmounted {
            problem = Some(format!("{} stayed busy for 20 s", self.dir.display()));
            // nbdfuse unmounts lazily on SIGTERM.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let exited = wait_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            problem.get_or_insert_with(|| "nbdfuse did not exit after its unmount".into());
            let _ = child.kill();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
        let _ = child.wait();
        problem.map_or(Ok(()), Err)
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("nbdfuse teardown: {e}");
        }
    }
}
