//! Filesystem helpers shared by the modules that keep state on disk.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Creates `path` and any missing parents with mode 0700 (whatever the umask adds), so that
/// state directories nbdcrypt creates are never group- or world-writable. Existing directories
/// are left as they are (`commands::check_state_dir` refuses loose ones).
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}
