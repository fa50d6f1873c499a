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
//! An I/O error on a mapping (or a file truncated under it) raises `SIGBUS`, which the
//! guard of `storage::sigbus` turns into a mark on the mapping: the pass discards what it
//! computed from that chunk and reads it again with `pread`, which reports the error (the
//! command then fails naming the volume, and can be run again) or reads a shorter file's
//! zeroes. It never ends the process.
//!
//! **Holes** (all-zero ciphertext, reading as zeroes) stay holes: re-encrypting them would
//! allocate the whole backing file.
//!
//! **The end:** both header copies get the new wrapped key and lose the old one and the
//! [`Rekey`]; then the journal is zeroed. The audit log has the KMS calls (purpose
//! `reencrypt`) and a record of the operation's start and end.

mod pass;

use std::sync::atomic::AtomicBool;

use super::header::{DATA_OFFSET, Header, Rekey};
use super::journal::{self, newest_record};
use super::lease::lock_for_change;
use super::manager::{Manager, engine_with_check};
use super::ondisk::{Copies, ManagerError, update_header};
use crate::crypto::{self, BackendChoice, SectorSize, XtsEngine};
use crate::kms::{Caller, EncryptionContext};
use crate::storage::Storage;
use pass::Job;

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
        journal::clear(store).map_err(|source| ManagerError::Store {
            volume: name.into(),
            what: "cannot clear the re-key journal",
            source,
        })?;
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
