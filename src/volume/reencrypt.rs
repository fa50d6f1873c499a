//! `volume reencrypt`: every sector decrypted with the volume's data key and encrypted with a
//! new one (KMS `GenerateDataKey` under the volume's KMS key), as `cryptsetup reencrypt` does
//! for LUKS2. Crash-safe and resumable; the volume is not served until it finishes.
//!
//! **State.** The header's [`Rekey`] holds the new key, wrapped, with its key-check value and
//! a random job id; the old key stays in the header until the end. The *re-key journal* (two
//! alternating record slots in the reserved area after the header copies) holds the
//! checkpoint: each record names one chunk (`start`, its sectors) and a 64-bit fingerprint of
//! the *old* ciphertext of each of the chunk's 512-byte units.
//!
//! **One chunk** (16 MiB): fingerprint its old ciphertext; write the chunk's record durably
//! (the other slot keeps the previous one); decrypt and re-encrypt the chunk into a private
//! buffer (in parallel), write it back and sync. Sectors before the newest record's chunk are new, sectors
//! after it old. A crash can leave only that chunk mixed: on resume each of its sectors is
//! classified by its units — all match their old fingerprints: old (re-encrypted again); none
//! does: new; some do: a torn sector write, refused rather than guessed (as `cryptsetup`'s
//! checksum resilience, this relies on 512-byte writes being atomic). A torn *record* fails
//! its checksum, and the previous record still describes a finished chunk. Because only the old
//! ciphertext is fingerprinted, the record can be written before the chunk changes at all.
//!
//! **Copies.** On a regular file the chunk's old ciphertext is read through a read-only
//! mapping ([`crate::storage::MappedRange`]): the cipher reads the page cache, and the only copy
//! is the `pwrite` of the new ciphertext (a plain copy does two). The result is never built in
//! the mapping itself: plaintext and half-written sectors would sit in the page cache, where
//! write-back or a `kill -9` could make them durable; a `pwrite` is interrupted by a kill only
//! between pages. Elsewhere (block devices, upstream exports) the chunk is read into a buffer.
//! An I/O error on a mapping (`SIGBUS`) ends the process like a crash, which the journal is
//! made for.
//!
//! **Holes** (all-zero ciphertext, reading as zeroes) stay holes: re-encrypting them would
//! allocate the whole backing file.
//!
//! **The end:** both header copies get the new wrapped key and lose the old one and the
//! [`Rekey`]; then the journal is zeroed. The audit log has the KMS calls (purpose
//! `reencrypt`) and a record of the operation's start and end.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::header::{DATA_OFFSET, HEADER_COPIES, HEADER_COPY_BYTES, Header, Rekey};
use super::lease::lock_for_change;
use super::manager::{Manager, engine_with_check};
use super::ondisk::{Copies, ManagerError, update_header};
use crate::codec::{Put, Reader};
use crate::crypto::{self, BackendChoice, SectorIndex, SectorSize, XtsEngine};
use crate::kms::{Caller, EncryptionContext};
use crate::storage::Storage;

/// Where the journal starts (after the two header copies, with room to spare).
const JOURNAL_AT: u64 = 16 * 1024;
/// One record slot; two fit between [`JOURNAL_AT`] and the data area.
const SLOT_BYTES: usize = 504 * 1024;
/// Bytes re-encrypted per record: 32 Ki units of 512 bytes, whose fingerprints fill 256 KiB.
/// Each chunk costs one sync of the data and one of the journal: large enough that a disk
/// streams, small enough that a crash redoes little.
pub const CHUNK_BYTES: u64 = 16 << 20;
/// The unit a device writes atomically, and that a fingerprint covers.
const UNIT: usize = 512;
const MAGIC: [u8; 8] = *b"NBDCRKJ2";
/// Work split for the parallel crypto pass.
const PIECE_BYTES: usize = 256 * 1024;

const _: () = {
    assert!(JOURNAL_AT >= (HEADER_COPIES * HEADER_COPY_BYTES) as u64);
    assert!(JOURNAL_AT + 2 * SLOT_BYTES as u64 <= DATA_OFFSET);
    assert!((CHUNK_BYTES as usize / UNIT) * 8 + 64 <= SLOT_BYTES);
};

/// One journal record: the chunk being re-encrypted and its units' old fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    job: u64,
    seq: u64,
    /// First sector of the chunk.
    start: u64,
    /// Old-ciphertext fingerprint of each 512-byte unit of the chunk.
    units: Vec<u64>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.units.len() * 8);
        out.extend_from_slice(&MAGIC);
        out.put_u64(self.job);
        out.put_u64(self.seq);
        out.put_u64(self.start);
        out.put_u32(u32::try_from(self.units.len()).unwrap_or(u32::MAX));
        for u in &self.units {
            out.put_u64(*u);
        }
        let crc = crc32fast::hash(&out);
        out.put_u32(crc);
        out
    }

    fn decode(slot: &[u8]) -> Option<Record> {
        if slot.len() < 40 || slot[..8] != MAGIC {
            return None;
        }
        let count = u32::from_be_bytes(slot[32..36].try_into().ok()?) as usize;
        let len = 36 + count.checked_mul(8)?;
        if len + 4 > slot.len() {
            return None;
        }
        let crc = u32::from_be_bytes(slot[len..len + 4].try_into().ok()?);
        if crc32fast::hash(&slot[..len]) != crc {
            return None;
        }
        let mut r = Reader::new(&slot[8..len]);
        let (job, seq, start) = (r.u64().ok()?, r.u64().ok()?, r.u64().ok()?);
        r.u32().ok()?;
        let mut units = Vec::with_capacity(count);
        for _ in 0..count {
            units.push(r.u64().ok()?);
        }
        Some(Record {
            job,
            seq,
            start,
            units,
        })
    }

    /// Bytes the chunk covers.
    fn bytes(&self) -> usize {
        self.units.len() * UNIT
    }
}

/// A 512-byte unit's ciphertext fingerprint: its first and last 8 bytes, mixed. Ciphertext is
/// uniformly random to anyone without the key, so a unit's old and new ciphertext have the
/// same fingerprint with probability 2^-64; reading 16 bytes per unit keeps it off the
/// re-key's critical path. (The ciphertext is no secret: neither is its fingerprint.)
fn unit_fingerprint(unit: &[u8]) -> u64 {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let n = unit.len();
    (word(&unit[..8]) ^ 0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0x2545_f491_4f6c_dd1d)
        .rotate_left(29)
        ^ word(&unit[n - 8..])
}

fn fingerprints(buf: &[u8]) -> Vec<u64> {
    buf.chunks(UNIT).map(unit_fingerprint).collect()
}

fn is_hole(sector: &[u8]) -> bool {
    sector.iter().all(|&b| b == 0)
}

/// The newest intact journal record of `job`.
fn newest_record(store: &dyn Storage, job: u64) -> std::io::Result<Option<Record>> {
    let mut best: Option<Record> = None;
    let mut slot = vec![0u8; SLOT_BYTES];
    for i in 0..2u64 {
        store.read_at(&mut slot, JOURNAL_AT + i * SLOT_BYTES as u64)?;
        if let Some(r) = Record::decode(&slot)
            && r.job == job
            && best.as_ref().is_none_or(|b| r.seq > b.seq)
        {
            best = Some(r);
        }
    }
    Ok(best)
}

/// Bytes of the data area already under the new key (the serve refusal says it).
pub fn checkpoint(store: &dyn Storage, h: &Header) -> u64 {
    let Some(rk) = &h.rekey else { return 0 };
    match newest_record(store, rk.job) {
        Ok(Some(r)) => r.start * u64::from(h.sector_size),
        _ => 0,
    }
}

/// What `volume reencrypt` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reencrypted {
    /// The header after the job (new key in both copies).
    pub header: Header,
    /// It went on from an interrupted run, at this byte.
    pub resumed_at: Option<u64>,
    /// Sectors that were holes and stayed so.
    pub holes: u64,
    /// The data area was rewritten in place through memory mappings (a regular file).
    pub mapped: bool,
}

/// The old and the new key of one job.
struct Job<'a> {
    name: &'a str,
    store: &'a dyn Storage,
    old: XtsEngine,
    new: XtsEngine,
    sector: usize,
    job: u64,
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
}

/// Byte ranges of a chunk that hold ciphertext (not holes), in order.
type Runs = Vec<(usize, usize)>;

impl Job<'_> {
    fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> ManagerError + '_ {
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
        buf.resize(len, 0);
        self.store
            .read_at(buf, at)
            .map_err(self.io("cannot read the data area"))?;
        Ok(Area::Buffer(buf))
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
    fn repair(&self, rec: &Record) -> Result<(), ManagerError> {
        let ss = self.sector;
        let per = ss / UNIT;
        let mut inbuf = Vec::new();
        let area = self.area(rec.start, rec.bytes(), &mut inbuf)?;
        let mut out = area.bytes().to_vec();
        drop(area);
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
    fn run(
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
            drop(area);
            committed?;
            if let Some(p) = pending.take() {
                done(p.start + (p.len as u64) / ss);
            }
            let (units, runs, h) = made?;
            holes += h;
            let record = Record {
                job: self.job,
                seq,
                start,
                units,
            };
            self.store
                .write_durable_at(&record.encode(), JOURNAL_AT + (seq % 2) * SLOT_BYTES as u64)
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

impl Manager<'_> {
    /// One audited `Decrypt` (purpose `reencrypt`) of `blob`, checked against `kcv`.
    fn unwrap_for_rekey(
        &self,
        name: &str,
        (key_id, blob, kcv): (&str, &[u8], &[u8; 32]),
        h: &Header,
        backend: BackendChoice,
    ) -> Result<XtsEngine, ManagerError> {
        let sector_size = sector_size_of(name, h)?;
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let mut plain = self
            .kms
            .decrypt(key_id, blob, &context, &self.rekey_caller())
            .map_err(|source| ManagerError::Kms {
                volume: name.into(),
                source,
            })?;
        let (engine, check) = engine_with_check(name, &mut plain, sector_size, backend)?;
        if !crate::codec::ct_eq(&check, kcv) {
            return Err(ManagerError::WrongKey(name.into()));
        }
        Ok(engine)
    }

    fn rekey_caller(&self) -> Caller {
        self.caller.for_purpose("reencrypt")
    }

    /// A new data key under the volume's KMS key: its engine and the header's [`Rekey`].
    fn new_data_key(
        &self,
        name: &str,
        h: &Header,
        backend: BackendChoice,
    ) -> Result<(XtsEngine, Rekey), ManagerError> {
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let kms_err = |source| ManagerError::Kms {
            volume: name.into(),
            source,
        };
        let mut dk = self
            .kms
            .generate_data_key(
                &h.key_id,
                crypto::VOLUME_KEY_BYTES,
                &context,
                &self.rekey_caller(),
            )
            .map_err(kms_err)?;
        self.verify_wrap(name, &dk.key_arn, &dk.blob, &context, |plain| {
            crate::codec::ct_eq(plain, &dk.plaintext)
        })?;
        let (engine, key_check) =
            engine_with_check(name, &mut dk.plaintext, sector_size_of(name, h)?, backend)?;
        let mut job = [0u8; 8];
        getrandom::fill(&mut job).map_err(|source| ManagerError::Entropy {
            what: "a re-key job id",
            source,
        })?;
        Ok((
            engine,
            Rekey {
                key_id: dk.key_arn.clone(),
                wrapped_key: dk.blob.clone(),
                key_check,
                job: u64::from_ne_bytes(job),
                started: crate::human::now_secs(),
            },
        ))
    }

    /// `volume reencrypt`: re-encrypts the whole data area under a new data key, or finishes
    /// an interrupted run (see the module docs). `progress` gets bytes done (first the
    /// checkpoint it starts from) and the total; when `stop` turns true (Ctrl-C) it stops at a
    /// chunk boundary with `Err(Reencrypting)`, resumable. Refused while the volume is served.
    pub fn reencrypt(
        &self,
        name: &str,
        backend: BackendChoice,
        mut progress: impl FnMut(u64, u64),
        stop: &AtomicBool,
    ) -> Result<Reencrypted, ManagerError> {
        let (entry, store, h) = self.open_store(name, false)?;
        lock_for_change(store.as_ref(), name, "; stop serving it first")
            .map_err(|e| e.at(&entry.backing))?;
        if h.incomplete {
            return Err(ManagerError::Incomplete {
                volume: name.into(),
                done: h.progress,
                size: h.size,
            });
        }
        let old =
            self.unwrap_for_rekey(name, (&h.key_id, &h.wrapped_key, &h.key_check), &h, backend)?;
        let (new, rekey, resuming) = match &h.rekey {
            Some(rk) => {
                let new = self.unwrap_for_rekey(
                    name,
                    (&rk.key_id, &rk.wrapped_key, &rk.key_check),
                    &h,
                    backend,
                )?;
                (new, rk.clone(), true)
            }
            None => {
                let (new, rk) = self.new_data_key(name, &h, backend)?;
                update_header(store.as_ref(), name, Copies::Both, |cur| {
                    if cur.rekey.is_some() {
                        return Err(ManagerError::Refused(format!(
                            "volume {name}: another reencrypt started meanwhile"
                        )));
                    }
                    cur.rekey = Some(rk.clone());
                    Ok(true)
                })
                .map_err(|e| e.at(&entry.backing))?;
                self.audit_rekey(name, &h, "started", None);
                crate::faults::crash_point("reencrypt-after-header");
                (new, rk, false)
            }
        };
        let sector = old.sector_size().bytes();
        let job = Job {
            name,
            store: store.as_ref(),
            old,
            new,
            sector,
            job: rekey.job,
        };
        let total_sectors = h.size / sector as u64;
        let mapped = store
            .map_range(DATA_OFFSET, sector)
            .is_ok_and(|m| m.is_some());
        let (mut next, mut seq, mut resumed_at) = (0u64, 1u64, None);
        let journal = newest_record(store.as_ref(), rekey.job)
            .map_err(job.io("cannot read the re-key journal"))?;
        if let Some(rec) = journal {
            job.repair(&rec)?;
            next = rec.start + (rec.bytes() / sector) as u64;
            seq = rec.seq + 1;
            resumed_at = Some(next * sector as u64);
        } else if resuming {
            resumed_at = Some(0);
        }
        if resumed_at.is_some() {
            tracing::info!(
                volume = name,
                at = next * sector as u64,
                "resuming an interrupted reencrypt"
            );
        }
        progress(next * sector as u64, h.size);
        let mut reached = next;
        let (finished, holes) = job.run(
            next,
            seq,
            total_sectors,
            |d| {
                reached = d;
                progress(d * sector as u64, h.size);
            },
            stop,
        )?;
        if !finished {
            return Err(ManagerError::Reencrypting {
                volume: name.into(),
                done: reached * sector as u64,
                size: h.size,
            });
        }
        crate::faults::crash_point("reencrypt-before-finish");
        let header = self.finish_rekey(name, store.as_ref(), &rekey)?;
        drop(job);
        self.audit_rekey(name, &header, "success", None);
        Ok(Reencrypted {
            header,
            resumed_at,
            holes,
            mapped,
        })
    }

    /// Swaps the keys in both header copies, then zeroes the journal.
    fn finish_rekey(
        &self,
        name: &str,
        store: &dyn Storage,
        rekey: &Rekey,
    ) -> Result<Header, ManagerError> {
        let header = update_header(store, name, Copies::Both, |cur| {
            if cur.rekey.as_ref().is_none_or(|r| r.job != rekey.job) {
                return Err(ManagerError::Refused(format!(
                    "volume {name}: its re-key state changed meanwhile; run reencrypt again"
                )));
            }
            cur.wrapped_key = rekey.wrapped_key.clone();
            cur.key_check = rekey.key_check;
            cur.key_id = rekey.key_id.clone();
            cur.rekey = None;
            Ok(true)
        })?;
        let zeroes = vec![0u8; 2 * SLOT_BYTES];
        let io = |source| ManagerError::Store {
            volume: name.into(),
            what: "cannot clear the re-key journal",
            source,
        };
        store.write_at(&zeroes, JOURNAL_AT).map_err(io)?;
        store.sync().map_err(io)?;
        Ok(header)
    }

    /// An audit record of the operation itself (the KMS calls have their own).
    fn audit_rekey(&self, name: &str, h: &Header, outcome: &str, message: Option<String>) {
        let log = crate::kms::audit::AuditLog::new(
            &crate::fsutil::StateLayout::new(&self.state_dir).audit_log(),
        );
        let record = crate::kms::audit::Record {
            time: crate::human::now_secs(),
            operation: "nbdcrypt:ReencryptVolume".into(),
            key: h.key_id.clone(),
            principal: self.caller.principal.clone(),
            volume: Some(name.into()),
            outcome: outcome.into(),
            error_code: None,
            error_message: message,
            purpose: Some("reencrypt".into()),
        };
        if let Err(e) = log.append(&record) {
            tracing::warn!(volume = name, error = %e, "cannot write the audit record of the reencrypt");
        }
    }
}

fn sector_size_of(name: &str, h: &Header) -> Result<SectorSize, ManagerError> {
    SectorSize::from_bytes(u64::from(h.sector_size)).map_err(|source| ManagerError::Crypto {
        volume: name.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn record_roundtrips_and_a_torn_record_is_ignored() {
        let r = Record {
            job: 9,
            seq: 4,
            start: 16384,
            units: (0..(CHUNK_BYTES as usize / UNIT) as u64)
                .map(|i| i * 3 + 1)
                .collect(),
        };
        let bytes = r.encode();
        assert!(bytes.len() <= SLOT_BYTES);
        let mut slot = vec![0u8; SLOT_BYTES];
        slot[..bytes.len()].copy_from_slice(&bytes);
        assert_eq!(Record::decode(&slot), Some(r));
        for cut in [bytes.len() / 2, bytes.len() - 1] {
            let mut torn = vec![0u8; SLOT_BYTES];
            torn[..cut].copy_from_slice(&bytes[..cut]);
            assert_eq!(Record::decode(&torn), None, "cut at {cut}");
        }
        assert_eq!(Record::decode(&vec![0u8; SLOT_BYTES]), None);
    }

    #[test]
    fn unit_fingerprint_changes_with_either_end_of_the_unit() {
        let mut a = vec![0u8; UNIT];
        getrandom::fill(&mut a).unwrap();
        let base = unit_fingerprint(&a);
        for i in [0, 7, UNIT - 8, UNIT - 1] {
            let mut b = a.clone();
            b[i] ^= 1;
            assert_ne!(unit_fingerprint(&b), base, "byte {i}");
        }
        let mut other = vec![0u8; UNIT];
        getrandom::fill(&mut other).unwrap();
        assert_ne!(unit_fingerprint(&other), base);
    }
}
