//! The re-key journal of `volume reencrypt` (docs/on-disk-format.md, "The re-key journal"):
//! two alternating record slots in the reserved area, each naming the chunk being re-encrypted
//! and the old-ciphertext fingerprint of each of its 512-byte units. A leaf: the lease and the
//! manager read the checkpoint from here, `reencrypt` writes the records.

use super::header::{DATA_OFFSET, HEADER_COPIES, HEADER_COPY_BYTES, Header};
use crate::codec::{Put, Reader};
use crate::storage::Storage;

/// Where the journal starts (after the two header copies, with room to spare).
pub(super) const JOURNAL_AT: u64 = 16 * 1024;
/// One record slot; two fit between [`JOURNAL_AT`] and the data area.
pub(super) const SLOT_BYTES: usize = 504 * 1024;
/// Bytes re-encrypted per record: 32 Ki units of 512 bytes, whose fingerprints fill 256 KiB.
/// Each chunk costs one sync of the data and one of the journal: large enough that a disk
/// streams, small enough that a crash redoes little.
pub(super) const CHUNK_BYTES: u64 = 16 << 20;
/// The unit a device writes atomically, and that a fingerprint covers.
pub(super) const UNIT: usize = 512;
const MAGIC: [u8; 8] = *b"NBDCRKJ2";

const _: () = {
    assert!(JOURNAL_AT >= (HEADER_COPIES * HEADER_COPY_BYTES) as u64);
    assert!(JOURNAL_AT + 2 * SLOT_BYTES as u64 <= DATA_OFFSET);
    assert!((CHUNK_BYTES as usize / UNIT) * 8 + 64 <= SLOT_BYTES);
};

/// One journal record: the chunk being re-encrypted and its units' old fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) job: u64,
    pub(super) seq: u64,
    /// First sector of the chunk.
    pub(super) start: u64,
    /// Old-ciphertext fingerprint of each 512-byte unit of the chunk.
    pub(super) units: Vec<u64>,
}

impl Record {
    pub(super) fn encode(&self) -> Vec<u8> {
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
    pub(super) fn bytes(&self) -> usize {
        self.units.len() * UNIT
    }
}

/// A 512-byte unit's ciphertext fingerprint: its first and last 8 bytes, mixed. Ciphertext is
/// uniformly random to anyone without the key, so a unit's old and new ciphertext have the
/// same fingerprint with probability 2^-64; reading 16 bytes per unit keeps it off the
/// re-key's critical path. (The ciphertext is no secret: neither is its fingerprint.)
pub(super) fn unit_fingerprint(unit: &[u8]) -> u64 {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let n = unit.len();
    (word(&unit[..8]) ^ 0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0x2545_f491_4f6c_dd1d)
        .rotate_left(29)
        ^ word(&unit[n - 8..])
}

pub(super) fn fingerprints(buf: &[u8]) -> Vec<u64> {
    buf.chunks(UNIT).map(unit_fingerprint).collect()
}

/// The newest intact journal record of `job`.
pub(super) fn newest_record(store: &dyn Storage, job: u64) -> std::io::Result<Option<Record>> {
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

/// Where record `seq` goes.
pub(super) fn slot_of(seq: u64) -> u64 {
    JOURNAL_AT + (seq % 2) * SLOT_BYTES as u64
}

/// Zeroes both slots and syncs (the job is over).
pub(super) fn clear(store: &dyn Storage) -> std::io::Result<()> {
    store.write_at(&vec![0u8; 2 * SLOT_BYTES], JOURNAL_AT)?;
    store.sync()
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
