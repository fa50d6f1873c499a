//! Holes: making ranges read as zeroes (`WRITE_ZEROES`), discarding them (`TRIM`), and
//! reporting which ranges are holes (`BLOCK_STATUS`). A hole is a sector whose ciphertext is
//! all zero bytes (see the module above); these are the operations that make or find them.

use std::io;

use super::{EncryptedVolume, Span, VolumeError, ZERO_CHUNK};

impl EncryptedVolume {
    /// Makes `offset..offset+len` read as zeroes. With discards on and `may_punch`, whole
    /// sectors become holes; otherwise encrypted zeroes are written (indistinguishable from
    /// data). With `fast_only`, a zeroing that would have to write refuses with `Unsupported`
    /// before touching anything.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check(offset, len)?;
        let punch = self.config.discards && may_punch;
        if fast_only && !punch {
            return Err(VolumeError::Unsupported("zeroing would write every byte"));
        }
        if len == 0 {
            return self.finish(fua);
        }
        let sector = self.sector();
        let span = Span::new(offset, len, sector);
        let _guard =
            self.locks
                .lock_for_write(span.first, span.count, span.head_partial, span.tail_partial);
        // Unaligned edges: read-modify-write with zero bytes.
        let end = offset + len;
        let mut body_start = span.first;
        let mut body_end = span.first + span.count;
        if span.head_partial {
            let stop = ((span.first + 1) * sector).min(end);
            self.zero_within_sector(span.first, offset, stop)?;
            body_start += 1;
        }
        if span.tail_partial && body_end > body_start {
            let last = span.first + span.count - 1;
            self.zero_within_sector(last, (last * sector).max(offset), end)?;
            body_end -= 1;
        }
        if body_end > body_start {
            let start_byte = self.config.data_offset + body_start * sector;
            let body_len = (body_end - body_start) * sector;
            match punch.then(|| self.storage.punch_hole(start_byte, body_len)) {
                Some(Ok(())) => {}
                Some(Err(e)) if fast_only => return Err(e.into()),
                _ => self.write_encrypted_zeroes(body_start, body_end)?,
            }
        }
        self.finish(fua)
    }

    fn zero_within_sector(&self, sector_index: u64, from: u64, to: u64) -> Result<(), VolumeError> {
        let sector = self.sector();
        let mut buf = vec![0u8; sector as usize];
        self.read_sectors(sector_index, &mut buf)?;
        let base = sector_index * sector;
        buf[(from - base) as usize..(to - base) as usize].fill(0);
        self.write_sectors(sector_index, &mut buf)
    }

    fn write_encrypted_zeroes(&self, mut first: u64, end: u64) -> Result<(), VolumeError> {
        let sector = self.sector();
        let per_chunk = (ZERO_CHUNK as u64 / sector).max(1);
        let mut buf = vec![0u8; (per_chunk.min(end - first) * sector) as usize];
        while first < end {
            let n = per_chunk.min(end - first);
            let chunk = &mut buf[..(n * sector) as usize];
            chunk.fill(0);
            self.write_sectors(first, chunk)?;
            first += n;
        }
        Ok(())
    }

    /// Discards whole sectors inside the range (discards on only; partial sectors are kept, as
    /// trim is advisory).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check(offset, len)?;
        if !self.config.discards {
            return Err(VolumeError::Unsupported("discards are off for this volume"));
        }
        let sector = self.sector();
        let first = offset.div_ceil(sector);
        let end = (offset + len) / sector;
        if end > first {
            let _guard = self.locks.lock_for_write(first, end - first, false, false);
            match self.storage.punch_hole(
                self.config.data_offset + first * sector,
                (end - first) * sector,
            ) {
                Ok(()) => {}
                // Advisory: a store that cannot punch simply keeps the data.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.finish(fua)
    }

    /// `base:allocation` extents for `offset..offset+len` as `(length, hole)` runs in volume
    /// coordinates (discards on only).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.check(offset, len)?;
        if !self.config.discards {
            return Err(VolumeError::Unsupported("block status needs discards on"));
        }
        let mut out: Vec<(u64, bool)> = Vec::new();
        for e in self
            .storage
            .extents(self.config.data_offset + offset, len)?
        {
            match out.last_mut() {
                Some(last) if last.1 == e.hole => last.0 += e.len,
                _ => out.push((e.len, e.hole)),
            }
        }
        Ok(out)
    }
}
