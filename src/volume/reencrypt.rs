//! `volume reencrypt`: every sector decrypted with the volume's data key and encrypted with a
//! new one (KMS `GenerateDataKey` under the volume's KMS key), as `cryptsetup reencrypt` does
//! for LUKS2. Crash-safe and resumable; the volume is not served until it finishes.
//!
//! **State.** The header's [`Rekey`] holds the new key, wrapped, with its key-check value and
//! a random job id; the old key stays in the header until the end. The *re-key journal* (two
//! alternating record slots in the reserved area after the header copies) holds the
//! checkpoint: each record names one chunk (`start`, `count` sectors) and, for each of its
//! sectors, a 64-bit hash of its old and of its new ciphertext.
//!
//! **One chunk** (8 MiB): read the old ciphertext; decrypt and re-encrypt it in memory (in
//! parallel); write the chunk's record durably (the other slot keeps the previous one); write
//! the new ciphertext and sync. Sectors before the newest record's chunk are new, sectors after
//! it old. A crash can leave only that chunk mixed: on resume each of its sectors is classified
//! by its hash — new, old (re-encrypted again), or neither (a torn sector write: refused, as
//! `cryptsetup`'s checksum resilience requires atomic sector writes too). A torn *record*
//! fails its checksum, and the previous record still describes a finished chunk.
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
/// Bytes re-encrypted per record: 16 Ki sectors of 512 bytes, whose hashes fill 256 KiB.
pub const CHUNK_BYTES: u64 = 8 << 20;
const MAGIC: [u8; 8] = *b"NBDCRKJ1";
/// Work split for the parallel crypto pass.
const PIECE_BYTES: usize = 256 * 1024;

const _: () = {
    assert!(JOURNAL_AT >= (HEADER_COPIES * HEADER_COPY_BYTES) as u64);
    assert!(JOURNAL_AT + 2 * SLOT_BYTES as u64 <= DATA_OFFSET);
    // The most sectors per chunk (512-byte sectors), 16 bytes each, plus the record's fields.
    assert!((CHUNK_BYTES / 512) as usize * 16 + 64 <= SLOT_BYTES);
};

/// One journal record: the chunk being re-encrypted and its sectors' hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    job: u64,
    seq: u64,
    /// First sector of the chunk.
    start: u64,
    /// `(old, new)` ciphertext hash of each sector; `(0, 0)` for a hole.
    hashes: Vec<(u64, u64)>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.hashes.len() * 16);
        out.extend_from_slice(&MAGIC);
        out.put_u64(self.job);
        out.put_u64(self.seq);
        out.put_u64(self.start);
        out.put_u32(u32::try_from(self.hashes.len()).unwrap_or(u32::MAX));
        for (old, new) in &self.hashes {
            out.put_u64(*old);
            out.put_u64(*new);
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
        let len = 36 + count.checked_mul(16)?;
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
        let mut hashes = Vec::with_capacity(count);
        for _ in 0..count {
            hashes.push((r.u64().ok()?, r.u64().ok()?));
        }
        Some(Record {
            job,
            seq,
            start,
            hashes,
        })
    }
}

/// A sector's ciphertext hash: CRC-32 of each half (tells new from old ciphertext; the
/// ciphertext is no secret, and the hash is of no use against it).
fn sector_hash(sector: &[u8]) -> u64 {
    let (a, b) = sector.split_at(sector.len() / 2);
    (u64::from(crc32fast::hash(a)) << 32) | u64::from(crc32fast::hash(b))
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
}

/// The old and the new key of one job, with the chunk geometry.
struct Job<'a> {
    name: &'a str,
    store: &'a dyn Storage,
    old: XtsEngine,
    new: XtsEngine,
    sector: usize,
    job: u64,
}

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

    /// Old ciphertext → new ciphertext, in place, holes left alone; returns the hashes.
    fn transform(&self, first: u64, buf: &mut [u8]) -> Result<Vec<(u64, u64)>, ManagerError> {
        let ss = self.sector;
        let per_piece = (PIECE_BYTES / ss).max(1);
        let pieces: Vec<Result<Vec<(u64, u64)>, crypto::CryptoError>> = buf
            .par_chunks_mut(per_piece * ss)
            .enumerate()
            .map(|(p, piece)| {
                let base = first + (p * per_piece) as u64;
                let mut hashes = Vec::with_capacity(piece.len() / ss);
                let mut i = 0;
                let n = piece.len() / ss;
                while i < n {
                    if is_hole(&piece[i * ss..(i + 1) * ss]) {
                        hashes.push((0, 0));
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < n && !is_hole(&piece[j * ss..(j + 1) * ss]) {
                        j += 1;
                    }
                    let run = &mut piece[i * ss..j * ss];
                    let olds: Vec<u64> = run.chunks(ss).map(sector_hash).collect();
                    self.old
                        .decrypt_sectors(SectorIndex(base + i as u64), run)?;
                    self.new
                        .encrypt_sectors(SectorIndex(base + i as u64), run)?;
                    hashes.extend(olds.into_iter().zip(run.chunks(ss).map(sector_hash)));
                    i = j;
                }
                Ok(hashes)
            })
            .collect();
        let mut all = Vec::with_capacity(buf.len() / ss);
        for p in pieces {
            all.extend(p.map_err(|e| self.crypto(e))?);
        }
        if let Some(i) = all.iter().position(|(o, n)| (*o, *n) != (0, 0) && o == n) {
            return Err(ManagerError::Refused(format!(
                "volume {}: sector {} hashes alike under both keys (a 2^-64 chance); nothing of this chunk was written, run the command again",
                self.name,
                first + i as u64
            )));
        }
        Ok(all)
    }

    /// Re-encrypts `count` sectors from `start` as journal record `seq`.
    fn chunk(&self, seq: u64, start: u64, count: u64) -> Result<u64, ManagerError> {
        let ss = self.sector;
        let at = DATA_OFFSET + start * ss as u64;
        let mut buf = vec![0u8; count as usize * ss];
        self.store
            .read_at(&mut buf, at)
            .map_err(self.io("cannot read the data area"))?;
        let hashes = self.transform(start, &mut buf)?;
        let holes = hashes.iter().filter(|h| **h == (0, 0)).count() as u64;
        let record = Record {
            job: self.job,
            seq,
            start,
            hashes,
        };
        self.store
            .write_durable_at(&record.encode(), JOURNAL_AT + (seq % 2) * SLOT_BYTES as u64)
            .map_err(self.io("cannot write the re-key journal"))?;
        crate::faults::crash_point(&format!("reencrypt-after-record:{seq}"));
        let half = buf.len() / 2 / ss * ss;
        self.store
            .write_at(&buf[..half], at)
            .map_err(self.io("cannot write the data area"))?;
        crate::faults::crash_point(&format!("reencrypt-mid-data:{seq}"));
        self.store
            .write_at(&buf[half..], at + half as u64)
            .map_err(self.io("cannot write the data area"))?;
        self.store
            .sync()
            .map_err(self.io("cannot sync the data area"))?;
        crate::faults::crash_point(&format!("reencrypt-after-data:{seq}"));
        Ok(holes)
    }

    /// The chunk of an interrupted run's newest record: each sector is new, old (done again)
    /// or neither (refused).
    fn repair(&self, rec: &Record) -> Result<(), ManagerError> {
        let ss = self.sector;
        let at = DATA_OFFSET + rec.start * ss as u64;
        let mut buf = vec![0u8; rec.hashes.len() * ss];
        self.store
            .read_at(&mut buf, at)
            .map_err(self.io("cannot read the data area"))?;
        let mut changed = false;
        for (i, (sector, (old, new))) in buf.chunks_mut(ss).zip(&rec.hashes).enumerate() {
            if (*old, *new) == (0, 0) || is_hole(sector) {
                continue;
            }
            let index = SectorIndex(rec.start + i as u64);
            let h = sector_hash(sector);
            if h == *new {
                continue;
            }
            if h != *old {
                return Err(ManagerError::Refused(format!(
                    "volume {}: sector {} of the interrupted chunk matches neither its old nor its new ciphertext (a torn sector write); re-encryption cannot go on safely: restore the volume from a backup",
                    self.name, index.0
                )));
            }
            self.old
                .decrypt_sectors(index, sector)
                .map_err(|e| self.crypto(e))?;
            self.new
                .encrypt_sectors(index, sector)
                .map_err(|e| self.crypto(e))?;
            changed = true;
        }
        if changed {
            self.store
                .write_at(&buf, at)
                .map_err(self.io("cannot write the data area"))?;
            self.store
                .sync()
                .map_err(self.io("cannot sync the data area"))?;
        }
        Ok(())
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
        let (mut next, mut seq, mut resumed_at) = (0u64, 1u64, None);
        let journal = newest_record(store.as_ref(), rekey.job)
            .map_err(job.io("cannot read the re-key journal"))?;
        if let Some(rec) = journal {
            job.repair(&rec)?;
            next = rec.start + rec.hashes.len() as u64;
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
        let per_chunk = CHUNK_BYTES / sector as u64;
        let mut holes = 0u64;
        progress(next * sector as u64, h.size);
        while next < total_sectors {
            if stop.load(Ordering::Relaxed) {
                return Err(ManagerError::Reencrypting {
                    volume: name.into(),
                    done: next * sector as u64,
                    size: h.size,
                });
            }
            let count = per_chunk.min(total_sectors - next);
            holes += job.chunk(seq, next, count)?;
            next += count;
            seq += 1;
            progress(next * sector as u64, h.size);
        }
        crate::faults::crash_point("reencrypt-before-finish");
        let header = self.finish_rekey(name, store.as_ref(), &rekey)?;
        drop(job);
        self.audit_rekey(name, &header, "success", None);
        Ok(Reencrypted {
            header,
            resumed_at,
            holes,
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
            hashes: (0..16384u64).map(|i| (i, i * 3 + 1)).collect(),
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
    fn sector_hash_sees_either_half() {
        let a = vec![7u8; 4096];
        let mut b = a.clone();
        b[4095] ^= 1;
        let mut c = a.clone();
        c[0] ^= 1;
        assert_ne!(sector_hash(&a), sector_hash(&b));
        assert_ne!(sector_hash(&a), sector_hash(&c));
    }
}
