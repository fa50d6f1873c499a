//! The `nbdcrypt` binary as a user runs it: `info` and `benchmark`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::peer_available;
use nbdcrypt::crypto::BackendKind;

fn nbdcrypt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env_remove("NBDCRYPT_XTS_BACKEND")
        .env_remove("NBDCRYPT_LOG");
    c
}

fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("run nbdcrypt");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "nbdcrypt failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn info_names_features_backends_and_selection() {
    let (out, _) = run(nbdcrypt().arg("info"));
    assert!(out.contains("cpu features:"), "{out}");
    assert!(out.contains("aes-xts-plain64"), "{out}");
    // auto: the VAES-512 kernel, else the VAES-256 one, else AWS-LC.
    let expected = if BackendKind::Vaes.is_available() {
        "vaes"
    } else if BackendKind::Vaes256.is_available() {
        "vaes256"
    } else {
        "hw"
    };
    assert!(
        out.contains(&format!("4096-byte sectors: {expected}")),
        "{out}"
    );
    for kind in BackendKind::ALL {
        assert!(out.contains(&format!("  {:<9} ", kind.name())), "{out}");
    }
    assert!(out.contains("key memory:"), "{out}");
}

#[test]
fn info_honours_the_backend_environment_variable() {
    let (out, _) = run(nbdcrypt()
        .arg("info")
        .env("NBDCRYPT_XTS_BACKEND", "portable"));
    assert!(out.contains("512-byte sectors: portable"), "{out}");
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let out = nbdcrypt()
        .args(["info", "--backend", "turbo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown XTS backend `turbo`"), "{err}");
}

#[test]
fn benchmark_prints_a_line_per_backend_and_sector_size() {
    let (out, _) =
        run(nbdcrypt().args(["benchmark", "--request-bytes", "8192", "--seconds", "0.01"]));
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("aes-xts")).collect();
    assert_eq!(lines.len(), 4 * BackendKind::available().len(), "{out}");
    assert!(lines.iter().all(|l| l.contains("MiB/s")), "{out}");
}

/// Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK = 0, mlock fails: the command still works, says
/// so, and logs a warning.
#[test]
fn refused_mlock_degrades_with_a_warning() {
    let setpriv = Command::new("setpriv").arg("--version").output();
    let prlimit = Command::new("prlimit").arg("--version").output();
    let available = match (setpriv, prlimit) {
        (Ok(a), Ok(b)) if a.status.success() && b.status.success() => Ok(()),
        _ => Err("setpriv and prlimit (util-linux) are needed".to_owned()),
    };
    if !peer_available("setpriv/prlimit", available) {
        return;
    }
    let out = Command::new("prlimit")
        .args(["--memlock=0:0", "--"])
        .args([
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_nbdcrypt"))
        .arg("info")
        .env_remove("NBDCRYPT_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("NOT locked"), "{stdout}");
    assert!(stderr.contains("could not lock key memory"), "{stderr}");
}

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    for (shell, marker) in [
        ("bash", "complete -F _nbdcrypt"),
        ("zsh", "#compdef nbdcrypt"),
        ("fish", "complete -c nbdcrypt"),
    ] {
        let (out, err) = run(nbdcrypt().args(["completions", shell]));
        assert!(out.contains(marker), "{shell}: {err}");
        for sub in ["serve", "volume", "kms", "keygen"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = nbdcrypt().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn state_dir_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("nbdcrypt-statedir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let (out, _) = run(nbdcrypt()
        .env("NBDCRYPT_STATE_DIR", &state)
        .args(["--log", "error", "volume", "create", "v", "--size", "8M"]));
    assert!(out.contains("created"), "{out}");
    // nbdcrypt creates its directories 0700, whatever the umask.
    for d in [state.clone(), state.join("kms"), state.join("volumes")] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", d.display());
    }
    for (d, mode) in [(state.clone(), 0o777), (state.join("kms"), 0o770)] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [
            &["volume", "list"][..],
            &["kms", "list-keys"],
            &["serve", "--volume", "v"],
        ] {
            let o = nbdcrypt()
                .env("NBDCRYPT_STATE_DIR", &state)
                .args(args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success(),
                "{args:?} ran with {} at {mode:o}",
                d.display()
            );
            assert!(err.contains("refusing the state directory"), "{err}");
            assert!(err.contains("chmod go-w"), "{err}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    run(nbdcrypt()
        .env("NBDCRYPT_STATE_DIR", &state)
        .args(["volume", "list"]));
    let _ = std::fs::remove_dir_all(&dir);
}
