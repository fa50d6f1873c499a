//! Keeps what the secret audit (`scripts/secrets-audit.py`) needs from each test directory
//! before it is removed.

/// The first 8 KiB of `path` (a volume's header copies) if they hold a local KMS blob.
fn local_kms_header(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 8192];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .ok()?;
    head.windows(4).any(|w| w == b"NBK1").then_some(head)
}

/// With `NBDCRYPT_TEST_ARTIFACTS=DIR` (set by `scripts/test.sh`), keeps what the secret audit
/// needs before a test directory is removed: every `*.log` file (server logs, audit logs), every
/// key file (64 raw bytes or 128 hex digits), every local KMS store (`keys.json`, its key
/// material), and the header copies of every volume wrapped by the local KMS (from which the
/// audit recovers the data key). `scripts/secrets-audit.py` then searches all the logs of the run for all the keys.
pub fn harvest_for_secret_audit(root: &std::path::Path) {
    let Some(out) = std::env::var_os("NBDCRYPT_TEST_ARTIFACTS") else {
        return;
    };
    let dest = std::path::Path::new(&out).join(root.file_name().unwrap_or_default());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let kind = if name.ends_with(".log") {
                "logs"
            } else if let Some(head) = (meta.len() >= 8192)
                .then(|| local_kms_header(&path))
                .flatten()
            {
                // A volume's backing store: keep its two header copies (the wrapped data key).
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('/', "_");
                if std::fs::create_dir_all(dest.join("headers")).is_ok() {
                    let _ = std::fs::write(dest.join("headers").join(rel), head);
                }
                continue;
            } else if name == "keys.json" {
                "kms"
            } else if (meta.len() == 64
                // A raw key is random bytes, not text (a 64-byte ready file is not a key).
                && std::fs::read(&path).is_ok_and(|b| !b.iter().all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace())))
                || ((128..=129).contains(&meta.len())
                    && std::fs::read(&path)
                        .is_ok_and(|b| b.iter().take(128).all(u8::is_ascii_hexdigit)))
            {
                "keys"
            } else {
                continue;
            };
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('/', "_");
            let target = dest.join(kind).join(rel);
            if std::fs::create_dir_all(dest.join(kind)).is_ok() {
                let _ = std::fs::copy(&path, target);
            }
        }
    }
}
