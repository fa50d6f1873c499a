//! Sector arithmetic of the read and write paths: a byte range split at sector boundaries, and
//! runs of all-zero (hole) or non-zero sectors in a buffer of ciphertext.

/// A byte range split at sector boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    /// First sector touched.
    pub(super) first: u64,
    /// Sectors touched.
    pub(super) count: u64,
    /// Offset of the range inside the first sector.
    pub(super) head_skip: usize,
    /// The first sector is only partly covered.
    pub(super) head_partial: bool,
    /// The last sector is only partly covered.
    pub(super) tail_partial: bool,
}

impl Span {
    pub(super) fn new(offset: u64, len: u64, sector: u64) -> Span {
        let first = offset / sector;
        let end = offset + len;
        let last_excl = end.div_ceil(sector);
        let head_skip = (offset % sector) as usize;
        let count = last_excl - first;
        Span {
            first,
            count,
            head_skip,
            head_partial: head_skip != 0 || (count == 1 && !end.is_multiple_of(sector)),
            tail_partial: !end.is_multiple_of(sector),
        }
    }
}

fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.as_chunks::<8>();
    chunks.iter().all(|c| u64::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

/// The run of sectors of size `sb` in `buf` that starts at sector `i`: where it ends (sector
/// index, exclusive) and whether it is all zeroes. Non-zero runs are as long as they go, so
/// that one cipher call covers them (batching).
pub(super) fn run_at(buf: &[u8], sb: usize, i: usize) -> (usize, bool) {
    let n = buf.len() / sb;
    let zero = is_zero(&buf[i * sb..(i + 1) * sb]);
    let mut j = i + 1;
    while j < n && is_zero(&buf[j * sb..(j + 1) * sb]) == zero {
        j += 1;
    }
    (j, zero)
}
