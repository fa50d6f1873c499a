//! `serve --user`: give up root once everything that needs it is done.
//!
//! The order is the classic one: supplementary groups, then the group, then the user (after
//! `setuid` the process could no longer change its groups). glibc applies each call to every
//! thread of the process, so the crypto workers and the runtime threads drop too. The drop is
//! then checked: regaining root must fail, and the process is marked undumpable again (a
//! credential change resets that flag to the system's `suid_dumpable`).
//!
//! [`no_new_privs`] is separate because it is per thread: `serve` sets it first thing, before
//! any thread exists, so every thread inherits it. It only stops privilege gains through
//! `execve` (which the server never does), so it does not stand in the way of the drop.

use nix::unistd::{Gid, Uid, User};

/// Why the privileges could not be dropped. The server does not start (or stops) on any of
/// these: running on as root when the operator asked otherwise would be worse.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The user does not exist.
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    /// The passwd lookup failed.
    #[error("--user {user}: cannot look the user up: {source}")]
    Lookup {
        /// The user.
        user: String,
        /// Why.
        source: nix::Error,
    },
    /// Not root, and not already that user.
    #[error("--user {user} needs the server to start as root (it runs as uid {uid})")]
    NotRoot {
        /// The user.
        user: String,
        /// The current uid.
        uid: u32,
    },
    /// A set*id call failed.
    #[error("--user {user}: {call} failed: {source}")]
    Call {
        /// The user.
        user: String,
        /// Which call.
        call: &'static str,
        /// Why.
        source: nix::Error,
    },
    /// Root could be regained after the drop.
    #[error("--user {0}: root could be regained after dropping privileges; refusing to run")]
    NotDropped(String),
}

/// The account `name` (or a numeric uid).
pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(name),
    };
    found
        .map_err(|source| PrivilegeError::Lookup {
            user: name.into(),
            source,
        })?
        .ok_or_else(|| PrivilegeError::NoSuchUser(name.into()))
}

/// Whether [`drop_to`] can succeed: the process is root, or already runs as `user`. Checked
/// before anything is opened, so a wrong `--user` costs no key unwrap.
pub fn check(name: &str, user: &User) -> Result<(), PrivilegeError> {
    let euid = Uid::effective();
    if euid.is_root() || (euid == user.uid && Uid::current() == user.uid) {
        Ok(())
    } else {
        Err(PrivilegeError::NotRoot {
            user: name.into(),
            uid: euid.as_raw(),
        })
    }
}

/// Switches the whole process to `user` and its primary group, with no supplementary groups.
/// A no-op when the process already runs as that user.
pub fn drop_to(name: &str, user: &User) -> Result<(), PrivilegeError> {
    let euid = Uid::effective();
    if euid == user.uid && Uid::current() == user.uid {
        return Ok(());
    }
    check(name, user)?;
    let call = |call: &'static str| {
        move |source| PrivilegeError::Call {
            user: name.into(),
            call,
            source,
        }
    };
    nix::unistd::setgroups(&[user.gid]).map_err(call("setgroups"))?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid).map_err(call("setresgid"))?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid).map_err(call("setresuid"))?;
    let regained_uid = !user.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok();
    let regained_gid = user.gid.as_raw() != 0 && nix::unistd::setgid(Gid::from_raw(0)).is_ok();
    if regained_uid || regained_gid {
        return Err(PrivilegeError::NotDropped(name.into()));
    }
    if !crate::crypto::locked::disable_core_dumps() {
        tracing::warn!("could not mark the process undumpable again after dropping privileges");
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS` for this thread and every thread it creates later.
pub fn no_new_privs() {
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        tracing::warn!(error = %e, "could not set PR_SET_NO_NEW_PRIVS");
    }
}
