//! Where a volume's bytes live: a local path (a file or a block device) or an upstream NBD
//! export (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), as `serve --export
//! file=…` reads them. The registry keeps either form as the entry's `backing`; every command of
//! the volume manager opens its store through [`open`], so a volume on an upstream export is
//! created, imported, served, rewrapped, filled and deleted exactly like one in a file: its
//! header lives in the first bytes of the export and travels with its data.
//!
//! What differs, and is decided here: an upstream is never created, sized or removed by us
//! (the storage engine owns it: an RBD image, an S3 object…); it has no locks, so one writer
//! per volume rests on the header lease alone (`super::lease`); and two entries name the same
//! upstream when their URIs are equal.

use std::path::Path;
use std::sync::Arc;

use crate::storage::{FileStorage, Storage};
use crate::upstream::{NbdStore, Options, target};

/// What volume commands use for an upstream: the default timeout, one connection (`serve` has
/// `--upstream-timeout` and `--upstream-connections`).
pub const DEFAULT_UPSTREAM: Options = Options {
    timeout: crate::upstream::DEFAULT_TIMEOUT,
    connections: 1,
};

/// Whether `backing` names an upstream NBD export rather than a path.
pub fn is_upstream(backing: &Path) -> bool {
    backing.to_str().is_some_and(target::is_uri)
}

/// Opens an existing store (never creating a file), read-only or not. An upstream that is
/// read-only is refused for writing; its errors name it.
pub fn open(
    backing: &Path,
    read_only: bool,
    upstream: &Options,
) -> std::io::Result<Arc<dyn Storage>> {
    let Some(uri) = backing.to_str().filter(|s| target::is_uri(s)) else {
        return Ok(Arc::new(FileStorage::open_existing(backing, read_only)?));
    };
    let store = NbdStore::open_with(uri, upstream).map_err(std::io::Error::other)?;
    if !read_only && store.info().has(crate::protocol::consts::flag::READ_ONLY) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the upstream {uri} is read-only"),
        ));
    }
    Ok(Arc::new(store))
}

/// Whether two backings name one store: the same URI, or for paths the same file (device and
/// inode), or the same absolute path if neither exists.
pub fn same(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if is_upstream(a) || is_upstream(b) {
        return a == b;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => {
            let canon = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
            canon(a) == canon(b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_upstreams_and_paths_are_not() {
        assert!(is_upstream(Path::new("nbd://127.0.0.1:10809/vol")));
        assert!(is_upstream(Path::new("nbd+unix:///img?socket=/run/q.sock")));
        assert!(!is_upstream(Path::new("/var/lib/nbdcrypt/volumes/a.img")));
        assert!(!is_upstream(Path::new("nbd.img")));
        assert!(same(Path::new("nbd://h/a"), Path::new("nbd://h/a")));
        assert!(!same(Path::new("nbd://h/a"), Path::new("nbd://h/b")));
        assert!(!same(Path::new("nbd://h/a"), Path::new("/tmp/a")));
    }
}
