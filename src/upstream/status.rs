//! The upstream's holes: `BLOCK_STATUS` in the `base:allocation` context, where the upstream
//! offers it ([`ExportInfo::allocation`](super::ExportInfo::allocation)).
//!
//! A range the upstream reports as reading zeroes is a hole of the volume too (all-zero
//! ciphertext reads as zeroes), so a client asking us for block status (`nbdcopy`,
//! `qemu-img convert`, a backup tool) skips what was never written on a thin store such as an
//! RBD image, instead of reading and copying every byte. Block status is advisory: an upstream
//! without the context is reported as all data, as before. So is one that refuses the command
//! (`EINVAL`, `ENOTSUP`, `EPERM`: not asked again), and a query that fails otherwise (an `EIO`
//! while the store recovers: that answer alone; the next query asks again).

use std::io;
use std::sync::atomic::Ordering;

use super::{NbdStore, UpstreamError};
use crate::protocol::consts::{cmd, err, state};
use crate::storage::Extent;

/// The longest range asked about in one request (a multiple of every minimum block size).
const MAX_QUERY: u64 = 1 << 30;

impl NbdStore {
    /// `base:allocation` extents covering `offset..offset+len` exactly: asked of the upstream
    /// where it can answer, else all data (and zeroes past its end, as a shorter file reads).
    pub(super) fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len);
        let info = self.info();
        let asks = info.allocation.is_some()
            && !self.no_status.load(Ordering::Relaxed)
            && self.aligned(offset, len).is_ok();
        if !asks || len == 0 {
            return Ok(vec![Extent { len, hole: false }]);
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            if pos >= info.size {
                out.push(Extent {
                    len: end - pos,
                    hole: true,
                });
                break;
            }
            let n = (end.min(info.size) - pos).min(MAX_QUERY);
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            let reply = match self.client().request(cmd::BLOCK_STATUS, 0, pos, n32, None) {
                Ok(reply) => reply,
                Err(UpstreamError::Errno { errno, message, .. }) => {
                    if refusal(errno) {
                        if !self.no_status.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                upstream = self.target.uri,
                                errno,
                                message,
                                "the upstream refused BLOCK_STATUS: its holes are no longer asked for (everything reads as data)"
                            );
                        }
                    } else {
                        // A passing failure (an EIO while the store recovers): this answer is
                        // all data, the next query asks again.
                        tracing::debug!(
                            upstream = self.target.uri,
                            errno,
                            message,
                            "BLOCK_STATUS failed on the upstream: reported as data this time"
                        );
                    }
                    out.push(Extent {
                        len: end - pos,
                        hole: false,
                    });
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let got = runs(&reply, u64::from(n32));
            if got.is_empty() {
                // Nothing usable (a server bug): the rest is data.
                out.push(Extent {
                    len: end - pos,
                    hole: false,
                });
                break;
            }
            for e in got {
                pos += e.len;
                match out.last_mut() {
                    Some(last) if last.hole == e.hole => last.len += e.len,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }
}

/// Whether an error answer to `BLOCK_STATUS` says the upstream will never answer one (it does
/// not support or permit the command), rather than that this query failed.
fn refusal(errno: u32) -> bool {
    matches!(errno, err::EINVAL | err::ENOTSUP | err::EPERM)
}

/// The extents of one reply's descriptors (length, flags), cut off at `limit` bytes (a server
/// may describe more than was asked) and ending at the first empty one (which the spec
/// forbids). Reads-as-zeroes is what makes a hole here.
fn runs(descriptors: &[u8], limit: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut covered = 0u64;
    for d in descriptors.chunks_exact(8) {
        let len = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
        let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        let len = len.min(limit - covered);
        if len == 0 {
            break;
        }
        out.push(Extent {
            len,
            hole: flags & state::ZERO != 0,
        });
        covered += len;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn desc(list: &[(u32, u32)]) -> Vec<u8> {
        list.iter()
            .flat_map(|(l, f)| l.to_be_bytes().into_iter().chain(f.to_be_bytes()))
            .collect()
    }

    fn pairs(e: &[Extent]) -> Vec<(u64, bool)> {
        e.iter().map(|e| (e.len, e.hole)).collect()
    }

    #[test]
    fn descriptors_become_extents_cut_at_the_request() {
        let zero = state::ZERO;
        let hole = state::HOLE | state::ZERO;
        // Reads-as-zeroes is a hole; unallocated but not zero is data.
        let d = desc(&[(4096, 0), (8192, hole), (4096, zero), (4096, state::HOLE)]);
        assert_eq!(
            pairs(&runs(&d, 1 << 20)),
            [(4096, false), (8192, true), (4096, true), (4096, false)]
        );
        // Longer than asked: cut off at the request's end.
        assert_eq!(
            pairs(&runs(&desc(&[(4096, 0), (1 << 20, hole)]), 8192)),
            [(4096, false), (4096, true)]
        );
        // An empty descriptor ends the list; nothing after it counts.
        assert_eq!(
            pairs(&runs(&desc(&[(4096, hole), (0, 0), (4096, 0)]), 1 << 20)),
            [(4096, true)]
        );
        assert!(runs(&[], 4096).is_empty());
    }

    /// The scripted server has no `base:allocation` (it refuses `SET_META_CONTEXT`): nothing
    /// is asked, everything is data.
    #[test]
    fn an_upstream_without_the_context_is_all_data() {
        use crate::storage::Storage;
        let (uri, _) = crate::upstream::fake::serve(crate::upstream::fake::Script::RefuseLargeDf);
        let store = NbdStore::open(&uri).unwrap();
        assert_eq!(store.info().allocation, None);
        assert_eq!(pairs(&store.extents(0, 65536).unwrap()), [(65536, false)]);
    }

    /// A failed query is all data that time only; a refusal (`EINVAL`) is all data for good:
    /// the scripted server answers EIO, a hole, EINVAL, then holes again.
    #[test]
    fn only_a_refusal_stops_block_status_queries() {
        use crate::storage::Storage;
        let (uri, _) = crate::upstream::fake::serve(crate::upstream::fake::Script::StatusErrors);
        let store = NbdStore::open(&uri).unwrap();
        assert_eq!(store.info().allocation, Some(7));
        let data = [(65536, false)];
        assert_eq!(pairs(&store.extents(0, 65536).unwrap()), data, "EIO");
        assert_eq!(
            pairs(&store.extents(0, 65536).unwrap()),
            [(65536, true)],
            "asked again after an EIO"
        );
        assert_eq!(pairs(&store.extents(0, 65536).unwrap()), data, "EINVAL");
        // The server would answer a hole now: not asked.
        assert_eq!(
            pairs(&store.extents(0, 65536).unwrap()),
            data,
            "not asked again"
        );
    }

    /// Block status for a context that was never negotiated is a protocol violation: the
    /// connection is dropped, and the query fails (after the upstream timeout) saying why;
    /// it is not taken for an answer.
    #[test]
    fn block_status_for_another_context_fails_the_connection() {
        use crate::storage::Storage;
        let (uri, _) = crate::upstream::fake::serve(crate::upstream::fake::Script::WrongContext);
        let opts = crate::upstream::Options {
            timeout: std::time::Duration::from_millis(300),
            connections: 1,
        };
        let store = NbdStore::open_with(&uri, &opts).unwrap();
        assert_eq!(store.info().allocation, Some(7));
        let e = store.extents(0, 65536).unwrap_err();
        assert!(e.to_string().contains("context 8"), "{e}");
    }
}
