//! Request validation: every transmission request is checked here, once, before any volume call.
//! Pure: no I/O, no volume, only the request and what was negotiated.

use crate::protocol::Request;
use crate::protocol::consts::{cmd, cmd_flag, err};

/// Default largest payload of a `READ` reply or a `WRITE` request (the advertised maximum
/// block size; `serve --max-request-mib`). 64 MiB, like nbdkit: clients that ignore block
/// sizes (the reference server's own tests) send writes of about 50 MB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024 * 1024;
/// The most `--max-request-mib` may raise it to.
pub const MAX_MAX_PAYLOAD: u32 = 1024 * 1024 * 1024;

/// What a connection negotiated and what its export allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `TRIM` is advertised (discards on).
    pub trim: bool,
    /// `base:allocation` was selected with `SET_META_CONTEXT` for this export.
    pub block_status: bool,
    /// Largest `READ`/`WRITE` payload (the advertised maximum block size).
    pub max_payload: u32,
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the `len`-byte payload at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Disconnect after in-flight requests.
    Disc,
    /// Make completed writes durable.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// Must not punch a hole.
        no_hole: bool,
        /// Fail with `ENOTSUP` rather than zero slowly.
        fast: bool,
    },
    /// Prefetch a range (`posix_fadvise(WILLNEED)` on the ciphertext).
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `base:allocation` status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// One extent is enough.
        req_one: bool,
    },
}

/// The outcome of validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Execute the command.
    Run(Command),
    /// Reply with this error. For a `WRITE`, the payload (`payload` bytes) must still be read
    /// and discarded to stay in sync.
    Fail {
        /// The NBD error value.
        errno: u32,
        /// Payload bytes that follow the header and must be skipped.
        payload: u32,
    },
    /// The client cannot be kept in sync (a write payload too large to skip): disconnect.
    Disconnect(&'static str),
}

fn fail(errno: u32) -> Verdict {
    Verdict::Fail { errno, payload: 0 }
}

/// Validates one request header.
pub fn validate(req: &Request, limits: &Limits) -> Verdict {
    let flags = req.flags;
    let in_range = |len: u32| {
        req.offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= limits.size)
    };
    let fua = flags & cmd_flag::FUA != 0;
    // Flags each command accepts; FUA is accepted everywhere and ignored where meaningless.
    let allowed = match req.kind {
        cmd::READ if limits.structured => cmd_flag::FUA | cmd_flag::DF,
        cmd::WRITE_ZEROES => cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmd_flag::FUA | cmd_flag::REQ_ONE,
        _ => cmd_flag::FUA,
    };
    let bad_flags = flags & !allowed != 0;
    match req.kind {
        cmd::WRITE => {
            if req.length > limits.max_payload {
                return Verdict::Disconnect(
                    "write payload larger than the advertised maximum block size",
                );
            }
            let errno = if bad_flags {
                Some(err::EINVAL)
            } else if limits.read_only {
                Some(err::EPERM)
            } else if !in_range(req.length) {
                Some(err::ENOSPC)
            } else {
                None
            };
            match errno {
                Some(errno) => Verdict::Fail {
                    errno,
                    payload: req.length,
                },
                None => Verdict::Run(Command::Write {
                    offset: req.offset,
                    len: req.length,
                    fua,
                }),
            }
        }
        _ if bad_flags => fail(err::EINVAL),
        cmd::READ => {
            if req.length > limits.max_payload {
                fail(err::EOVERFLOW)
            } else if req.length == 0 || !in_range(req.length) {
                // A zero-length read has no data chunk to send (a chunk's length MUST be at
                // least 9): EINVAL, as nbdkit answers it, with simple replies too.
                fail(err::EINVAL)
            } else {
                Verdict::Run(Command::Read {
                    offset: req.offset,
                    len: req.length,
                })
            }
        }
        cmd::DISC => Verdict::Run(Command::Disc),
        cmd::FLUSH => Verdict::Run(Command::Flush),
        cmd::TRIM => {
            // The spec: writes and trims on a read-only export fail with EPERM.
            if limits.read_only {
                fail(err::EPERM)
            } else if !limits.trim || !in_range(req.length) {
                fail(err::EINVAL)
            } else {
                Verdict::Run(Command::Trim {
                    offset: req.offset,
                    len: req.length,
                    fua,
                })
            }
        }
        cmd::WRITE_ZEROES => {
            if limits.read_only {
                fail(err::EPERM)
            } else if !in_range(req.length) {
                fail(err::ENOSPC)
            } else {
                Verdict::Run(Command::WriteZeroes {
                    offset: req.offset,
                    len: req.length,
                    fua,
                    no_hole: flags & cmd_flag::NO_HOLE != 0,
                    fast: flags & cmd_flag::FAST_ZERO != 0,
                })
            }
        }
        cmd::BLOCK_STATUS => {
            if !limits.block_status
                || !limits.structured
                || req.length == 0
                || !in_range(req.length)
            {
                fail(err::EINVAL)
            } else {
                Verdict::Run(Command::BlockStatus {
                    offset: req.offset,
                    len: req.length,
                    req_one: flags & cmd_flag::REQ_ONE != 0,
                })
            }
        }
        cmd::CACHE => {
            if req.length == 0 || !in_range(req.length) {
                fail(err::EINVAL)
            } else {
                Verdict::Run(Command::Cache {
                    offset: req.offset,
                    len: req.length,
                })
            }
        }
        // RESIZE and unknown commands are not advertised: EINVAL, no payload assumed.
        _ => fail(err::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        trim: true,
        block_status: true,
        max_payload: DEFAULT_MAX_PAYLOAD,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn validate_out_of_range_is_einval_for_reads_and_enospc_for_writes() {
        let past = (1 << 20) - 100;
        assert_eq!(
            validate(&req(cmd::READ, 0, past, 512), &LIMITS),
            fail(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::TRIM, 0, past, 512), &LIMITS),
            fail(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::WRITE, 0, past, 512), &LIMITS),
            Verdict::Fail {
                errno: err::ENOSPC,
                payload: 512
            }
        );
        assert_eq!(
            validate(&req(cmd::WRITE_ZEROES, 0, past, 512), &LIMITS),
            fail(err::ENOSPC)
        );
        assert_eq!(
            validate(&req(cmd::READ, 0, u64::MAX, 512), &LIMITS),
            fail(err::EINVAL)
        );
    }

    #[test]
    fn validate_read_only_is_eperm() {
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        assert_eq!(
            validate(&req(cmd::WRITE, 0, 0, 512), &ro),
            Verdict::Fail {
                errno: err::EPERM,
                payload: 512
            }
        );
        assert_eq!(
            validate(&req(cmd::WRITE_ZEROES, 0, 0, 512), &ro),
            fail(err::EPERM)
        );
        assert_eq!(validate(&req(cmd::TRIM, 0, 0, 512), &ro), fail(err::EPERM));
        assert!(matches!(
            validate(&req(cmd::READ, 0, 0, 512), &ro),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn validate_bad_flags_and_unknown_commands_are_einval() {
        assert_eq!(
            validate(&req(cmd::READ, cmd_flag::NO_HOLE, 0, 512), &LIMITS),
            fail(err::EINVAL)
        );
        let simple = Limits {
            structured: false,
            ..LIMITS
        };
        assert_eq!(
            validate(&req(cmd::READ, cmd_flag::DF, 0, 512), &simple),
            fail(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::FLUSH, 1 << 9, 0, 0), &LIMITS),
            fail(err::EINVAL)
        );
        assert_eq!(validate(&req(99, 0, 0, 0), &LIMITS), fail(err::EINVAL));
        assert_eq!(
            validate(&req(cmd::RESIZE, 0, 0, 512), &LIMITS),
            fail(err::EINVAL)
        );
    }

    #[test]
    fn validate_zero_length_read_and_cache_are_einval_in_both_reply_modes() {
        for structured in [true, false] {
            let l = Limits {
                structured,
                ..LIMITS
            };
            assert_eq!(validate(&req(cmd::READ, 0, 0, 0), &l), fail(err::EINVAL));
            assert_eq!(validate(&req(cmd::CACHE, 0, 0, 0), &l), fail(err::EINVAL));
        }
        assert_eq!(
            validate(&req(cmd::CACHE, 0, 4096, 8192), &LIMITS),
            Verdict::Run(Command::Cache {
                offset: 4096,
                len: 8192
            })
        );
    }

    #[test]
    fn validate_max_payload_is_configurable() {
        let l = Limits {
            max_payload: 1 << 20,
            ..LIMITS
        };
        assert_eq!(
            validate(&req(cmd::READ, 0, 0, (1 << 20) + 1), &l),
            fail(err::EOVERFLOW)
        );
        assert!(matches!(
            validate(&req(cmd::READ, 0, 0, 1 << 20), &l),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn validate_too_long_is_eoverflow_or_disconnect() {
        assert_eq!(
            validate(&req(cmd::READ, 0, 0, DEFAULT_MAX_PAYLOAD + 1), &LIMITS),
            fail(err::EOVERFLOW)
        );
        assert!(matches!(
            validate(&req(cmd::WRITE, 0, 0, DEFAULT_MAX_PAYLOAD + 1), &LIMITS),
            Verdict::Disconnect(_)
        ));
    }

    #[test]
    fn validate_trim_and_block_status_need_their_features() {
        let plain = Limits {
            trim: false,
            block_status: false,
            ..LIMITS
        };
        assert_eq!(
            validate(&req(cmd::TRIM, 0, 0, 512), &plain),
            fail(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::BLOCK_STATUS, 0, 0, 512), &plain),
            fail(err::EINVAL)
        );
    }

    proptest! {
        #[test]
        fn validate_never_panics_and_runs_only_in_range(flags: u16, kind: u16, offset: u64, length: u32) {
            let r = req(kind, flags, offset, length);
            if let Verdict::Run(c) = validate(&r, &LIMITS) {
                let span = match c {
                    Command::Read { offset, len } | Command::Write { offset, len, .. }
                    | Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. }
                    | Command::BlockStatus { offset, len, .. }
                    | Command::Cache { offset, len } => Some((offset, len)),
                    Command::Disc | Command::Flush => None,
                };
                if let Some((o, l)) = span {
                    prop_assert!(o + u64::from(l) <= LIMITS.size);
                }
            }
        }
    }
}
