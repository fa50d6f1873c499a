//! The data pass of a re-key: one [`Job`] holds the old and the new engine and re-encrypts
//! chunks, writing the journal record of each before anything of it changes, and repairs the
//! chunk an interrupted run left (see the parent module for the crash-safety argument).

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::crypto::{self, SectorIndex, XtsEngine};
use crate::storage::Storage;
use crate::volume::header::DATA_OFFSET;
use crate::volume::journal::{self, CHUNK_BYTES, Record, UNIT, fingerprints, unit_fingerprint};
use crate::volume::ondisk::ManagerError;

/// Work split for the parallel crypto pass.
const PIECE_BYTES: usize = 256 * 1024;

fn is_hole(sector: &[u8]) -> bool {
    sector.iter().all(|&b| b == 0)
}

/// The old and the new key of one job.
pub(super) struct Job<'a> {
    pub(super) name: &'a str,
    pub(super) store: &'a dyn Storage,
    pub(super) old: XtsEngine,
    pub(super) new: XtsEngine,
    pub(super) sector: usize,
    pub(super) job: u64,
}

/// A chunk's old ciphertext: mapped (a regular file), or read into a buffer.
enum Area<'b> {
    Mapped(crate::storage::MappedRange),
    Buffer(&'b [u8]),
}

impl Area<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Area::Mapped(m) => m.bytes(),
            Area::Buffer(b) => b,
        }
    }

    /// Whether an access to the mapping faulted (an I/O error, a truncation): what was read
    /// through it is void.
    fn faulted(&self) -> bool {
        matches!(self, Area::Mapped(m) if m.faulted())
    }
}

/// Byte ranges of a chunk that hold ciphertext (not holes), in order.
type Runs = Vec<(usize, usize)>;

impl Job<'_> {
    pub(super) fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> ManagerError + '_ {
        move |source| ManagerError::Store {
            volume: self.name.into(),
            what,
            source,
        }
    }

    fn crypto(&self, source: crypto::CryptoError) -> ManagerError {
        ManagerError::Crypto {
            volume: self.name.into(),
            source,
        }
    }

    /// Byte offset in the store of sector `s`.
    fn at(&self, s: u64) -> u64 {
        DATA_OFFSET + s * self.sector as u64
    }

    /// The `len` bytes of the store from sector `start`: mapped where the store can, else read
    /// into `buf`.
    fn area<'b>(
        &self,
        start: u64,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<Area<'b>, ManagerError> {
        let at = self.at(start);
        if let Some(m) = self
            .store
            .map_range(at, len)
            .map_err(self.io("cannot map the data area"))?
        {
            return Ok(Area::Mapped(m));
        }
        Ok(Area::Buffer(self.read_area(start, len, buf)?))
    }

    /// The `len` bytes of the store from sector `start`, read into `buf`.
    fn read_area<'b>(
        &self,
        start: u64,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], ManagerError> {
        buf.resize(len, 0);
        self.store
            .read_at(buf, self.at(start))
            .map_err(self.io("cannot read the data area"))?;
        Ok(buf)
    }

    /// After an access to the mapping of sectors `start..` faulted: says so, and reads the
    /// range again with `pread`, which reports the error (or reads a shorter file's zeroes).
    fn reread<'b>(
        &self,
        start: u64,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], ManagerError> {
        tracing::warn!(
            volume = self.name,
            at = self.at(start),
            len,
            "reading the mapped data area faulted (an I/O error, or the file was truncated): reading it again without the mapping"
        );
        self.read_area(start, len, buf)
    }

    /// Writes the `runs` of `out` (the chunk from sector `start`) and syncs: the chunk's new
    /// ciphertext is durable. Holes are not written (they would be allocated).
    fn commit(&self, seq: u64, start: u64, out: &[u8], runs: &Runs) -> Result<(), ManagerError> {
        let half = out.len() / 2 / self.sector * self.sector;
        let at = self.at(start);
        let write = self.io("cannot write the data area");
        // Runs split at `half`, for the crash point between the two halves.
        let pieces = runs.iter().flat_map(|&(a, b)| {
            if a < half && half < b {
                vec![(a, half), (half, b)]
            } else {
                vec![(a, b)]
            }
        });
        let (first, second): (Vec<_>, Vec<_>) = pieces.partition(|&(a, _)| a < half);
        for (a, b) in first {
            self.store
                .write_at(&out[a..b], at + a as u64)
                .map_err(&write)?;
        }
        crate::faults::crash_point(&format!("reencrypt-mid-data:{seq}"));
        for (a, b) in second {
            self.store
                .write_at(&out[a..b], at + a as u64)
                .map_err(&write)?;
        }
        self.store
            .sync()
            .map_err(self.io("cannot sync the data area"))?;
        crate::faults::crash_point(&format!("reencrypt-after-data:{seq}"));
        Ok(())
    }

    /// Old ciphertext `src` → new ciphertext `dst`, in parallel, out of place (plaintext exists
    /// only in `dst`, private memory, never in the page cache). Returns the old fingerprint of
    /// every unit, the runs that hold ciphertext and the number of hole sectors.
    fn transform(
        &self,
        first: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(Vec<u64>, Runs, u64), ManagerError> {
        let ss = self.sector;
        let per_piece = (PIECE_BYTES / ss).max(1) * ss;
        let pieces: Result<Vec<(Vec<u64>, Runs, u64)>, crypto::CryptoError> = src
            .par_chunks(per_piece)
            .zip(dst.par_chunks_mut(per_piece))
            .enumerate()
            .map(|(p, (src, dst))| {
                let base = first + (p * per_piece / ss) as u64;
                let n = src.len() / ss;
                let units = fingerprints(src);
                let (mut i, mut holes, mut runs) = (0, 0u64, Runs::new());
                while i < n {
                    if is_hole(&src[i * ss..(i + 1) * ss]) {
                        holes += 1;
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < n && !is_hole(&src[j * ss..(j + 1) * ss]) {
                        j += 1;
                    }
                    let (from, to) = (i * ss, j * ss);
                    let index = SectorIndex(base + i as u64);
                    self.old
                        .decrypt_sectors_to(index, &src[from..to], &mut dst[from..to])?;
                    self.new.encrypt_sectors(index, &mut dst[from..to])?;
                    runs.push((p * per_piece + from, p * per_piece + to));
                    i = j;
                }
                Ok((units, runs, holes))
            })
            .collect();
        let mut runs = Runs::new();
        let mut holes = 0;
        let mut units = Vec::with_capacity(src.len() / UNIT);
        for (piece_units, piece_runs, h) in pieces.map_err(|e| self.crypto(e))? {
            units.extend(piece_units);
            holes += h;
            for (a, b) in piece_runs {
                match runs.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => runs.push((a, b)),
                }
            }
        }
        Ok((units, runs, holes))
    }

    /// The chunk of an interrupted run's newest record: each sector is old (all its units
    /// match their fingerprints: re-encrypted now), new (none does) or torn (refused).
    pub(super) fn repair(&self, rec: &Record) -> Result<(), ManagerError> {
        let ss = self.sector;
        let per = ss / UNIT;
        let mut inbuf = Vec::new();
        let area = self.area(rec.start, rec.bytes(), &mut inbuf)?;
        let mut out = area.bytes().to_vec();
        let faulted = area.faulted();
        drop(area);
        if faulted {
            out = self.reread(rec.start, rec.bytes(), &mut inbuf)?.to_vec();
        }
        let mut runs = Runs::new();
        for (i, sector) in out.chunks_mut(ss).enumerate() {
            if is_hole(sector) {
                continue;
            }
            let index = SectorIndex(rec.start + i as u64);
            let olds = rec.units[i * per..(i + 1) * per]
                .iter()
                .zip(sector.chunks(UNIT))
                .filter(|(fp, unit)| unit_fingerprint(unit) == **fp)
                .count();
            if olds == 0 {
                continue;
            }
            if olds < per {
                return Err(ManagerError::Refused(format!(
                    "volume {}: sector {} of the interrupted chunk is part old, part new ciphertext (a torn sector write); re-encryption cannot go on safely: restore the volume from a backup",
                    self.name, index.0
                )));
            }
            self.old
                .decrypt_sectors(index, sector)
                .map_err(|e| self.crypto(e))?;
            self.new
                .encrypt_sectors(index, sector)
                .map_err(|e| self.crypto(e))?;
            match runs.last_mut() {
                Some(last) if last.1 == i * ss => last.1 += ss,
                _ => runs.push((i * ss, (i + 1) * ss)),
            }
        }
        if !runs.is_empty() {
            self.commit(rec.seq, rec.start, &out, &runs)?;
        }
        Ok(())
    }

    /// Re-encrypts sectors `from..total` as records `seq`, `seq + 1`, …, one chunk each;
    /// `done` gets the sectors finished so far. `Ok((false, _))`: `stop` ended it at a chunk
    /// boundary.
    ///
    /// Pipelined: while chunk k is fingerprinted and transformed (into private memory), chunk
    /// k-1's new ciphertext is written and synced; then record k is written. So record k is
    /// durable only after chunk k-1 is, and chunk k is written only after record k: at most
    /// the newest record's chunk is ever mixed.
    pub(super) fn run(
        &self,
        from: u64,
        mut seq: u64,
        total: u64,
        mut done: impl FnMut(u64),
        stop: &AtomicBool,
    ) -> Result<(bool, u64), ManagerError> {
        struct Pending {
            seq: u64,
            start: u64,
            len: usize,
            runs: Runs,
        }
        let ss = self.sector as u64;
        let per_chunk = CHUNK_BYTES / ss;
        let (mut start, mut holes) = (from, 0u64);
        let (mut inbuf, mut cur, mut prev) = (Vec::new(), Vec::new(), Vec::new());
        let mut pending: Option<Pending> = None;
        let mut finished = true;
        while start < total {
            if stop.load(Ordering::Relaxed) {
                finished = false;
                break;
            }
            let len = (per_chunk.min(total - start) * ss) as usize;
            let area = self.area(start, len, &mut inbuf)?;
            cur.resize(len, 0);
            let (made, committed) = rayon::join(
                || self.transform(start, area.bytes(), &mut cur),
                || -> Result<(), ManagerError> {
                    match &pending {
                        Some(p) => self.commit(p.seq, p.start, &prev[..p.len], &p.runs),
                        None => Ok(()),
                    }
                },
            );
            let faulted = area.faulted();
            drop(area);
            committed?;
            if let Some(p) = pending.take() {
                done(p.start + (p.len as u64) / ss);
            }
            let made = if faulted {
                let again = self.reread(start, len, &mut inbuf)?;
                self.transform(start, again, &mut cur)
            } else {
                made
            };
            let (units, runs, h) = made?;
            holes += h;
            let record = Record {
                job: self.job,
                seq,
                start,
                units,
            };
            self.store
                .write_durable_at(&record.encode(), journal::slot_of(seq))
                .map_err(self.io("cannot write the re-key journal"))?;
            crate::faults::crash_point(&format!("reencrypt-after-record:{seq}"));
            pending = Some(Pending {
                seq,
                start,
                len,
                runs,
            });
            std::mem::swap(&mut cur, &mut prev);
            start += (len as u64) / ss;
            seq += 1;
        }
        if let Some(p) = pending {
            self.commit(p.seq, p.start, &prev[..p.len], &p.runs)?;
            done(p.start + (p.len as u64) / ss);
        }
        Ok((finished, holes))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use crate::crypto::{BackendChoice, SectorSize, VolumeKey};
    use crate::storage::{FileStorage, MappedRange};

    fn engine(seed: u8) -> XtsEngine {
        let mut raw: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(29).wrapping_add(seed))
            .collect();
        let key = VolumeKey::take_from(&mut raw).unwrap();
        XtsEngine::new(&key, SectorSize::S4096, BackendChoice::Auto).unwrap()
    }

    const MIB: usize = 1 << 20;
    /// A chunk and a half.
    const DATA_LEN: usize = 24 * MIB;
    /// What is left of the data area after the truncation.
    const KEPT: usize = 8 * MIB;

    /// A file holding `plain` under `old`, truncated to `KEPT` bytes of data.
    fn truncated(tag: &str, plain: &[u8], old: &XtsEngine) -> (std::path::PathBuf, FileStorage) {
        let path = std::env::temp_dir().join(format!("nbdcrypt-pass-{tag}-{}", std::process::id()));
        let mut cipher = plain.to_vec();
        old.encrypt_sectors(SectorIndex(0), &mut cipher).unwrap();
        let store = FileStorage::open(&path, 0, false).unwrap();
        store.write_at(&cipher, DATA_OFFSET).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(DATA_OFFSET + KEPT as u64)
            .unwrap();
        assert!(
            store
                .map_range(DATA_OFFSET, CHUNK_BYTES as usize)
                .unwrap()
                .is_some(),
            "the test needs the mapped path"
        );
        (path, store)
    }

    fn job<'a>(store: &'a dyn Storage, old: XtsEngine, new: XtsEngine) -> Job<'a> {
        Job {
            name: "pass-test",
            store,
            old,
            new,
            sector: 4096,
            job: 1,
        }
    }

    fn plain() -> Vec<u8> {
        (0..DATA_LEN).map(|i| ((i * 7 + 3) % 251) as u8).collect()
    }

    /// A backing file truncated under the pass: its mapping faults past the new end. The
    /// guard turns that into a re-read with `pread` (the missing part reads as zeroes, i.e.
    /// holes), so the pass finishes instead of the process dying of `SIGBUS`; what is still
    /// there is re-encrypted under the new key, and nothing is written past the end.
    #[test]
    fn a_file_truncated_under_the_pass_faults_but_never_kills() {
        let plain = plain();
        let (path, store) = truncated("trunc", &plain, &engine(1));
        let job = job(&store, engine(1), engine(2));
        let total = (DATA_LEN / 4096) as u64;
        let (finished, holes) = job
            .run(0, 1, total, |_| {}, &AtomicBool::new(false))
            .unwrap();
        assert!(finished);
        assert_eq!(holes, ((DATA_LEN - KEPT) / 4096) as u64);
        let mut back = std::fs::read(&path)
            .unwrap()
            .split_off(DATA_OFFSET as usize);
        assert_eq!(back.len(), KEPT, "nothing written past the end");
        job.new.decrypt_sectors(SectorIndex(0), &mut back).unwrap();
        assert!(back == plain[..KEPT]);
        std::fs::remove_file(path).unwrap();
    }

    /// A store whose data area cannot be read with `pread` (an I/O error), mapped like the
    /// file under it.
    #[derive(Debug)]
    struct Unreadable(FileStorage);

    impl Storage for Unreadable {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if offset >= DATA_OFFSET {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.0.punch_hole(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<crate::storage::Extent>> {
            self.0.extents(offset, len)
        }
        fn size(&self) -> std::io::Result<u64> {
            self.0.size()
        }
        fn map_range(&self, offset: u64, len: usize) -> std::io::Result<Option<MappedRange>> {
            self.0.map_range(offset, len)
        }
    }

    /// The faulted page reads as zeroes through the mapping: taken for holes, the sectors
    /// under it would keep their old ciphertext while the header moves to the new key. The
    /// pass must not use them: it reads the chunk again, and the read's error ends the pass
    /// with an error naming the volume and what failed.
    #[test]
    fn a_faulted_mapping_is_never_taken_for_holes() {
        let plain = plain();
        let (path, store) = truncated("eio", &plain, &engine(1));
        let store = Unreadable(store);
        let job = job(&store, engine(1), engine(2));
        let total = (DATA_LEN / 4096) as u64;
        let err = job
            .run(0, 1, total, |_| {}, &AtomicBool::new(false))
            .expect_err("an unreadable chunk fails the pass");
        let msg = err.to_string();
        assert!(msg.contains("cannot read the data area"), "{msg}");
        assert!(msg.contains("pass-test"), "{msg}");
        std::fs::remove_file(path).unwrap();
    }
}
