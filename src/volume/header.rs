//! The volume header: what a backing file says about itself. Pure encode/decode plus the
//! crash-safe update rule; no key material beyond the *wrapped* key blob.
//!
//! Layout of a backing file (`docs/on-disk-format.md`):
//!
//! ```text
//! 0        4 KiB  header copy 0
//! 4 KiB    4 KiB  header copy 1
//! 8 KiB …  1 MiB  reserved (zero)
//! 1 MiB …         encrypted data area
//! ```
//!
//! Each copy is self-contained and checksummed (CRC-32 over everything before the checksum) and
//! carries a sequence number. An update writes the *older* copy with the next sequence number
//! and syncs; the newer copy stays intact until the next update, so a torn write damages at most
//! one copy and the volume opens from the other. Reading picks the valid copy with the higher
//! sequence number.

use crate::codec::{DecodeError, Put, Reader};

/// Bytes reserved for one header copy.
pub const HEADER_COPY_BYTES: usize = 4096;
/// Number of copies.
pub const HEADER_COPIES: usize = 2;
/// Where the encrypted data area starts.
pub const DATA_OFFSET: u64 = 1 << 20;
/// `"NBDCRYPT"`.
pub const MAGIC: [u8; 8] = *b"NBDCRYPT";
/// Format version written. Versions 1 (no lease, no `incomplete` state) and 2 (no re-key
/// state) are still read, and become version 3 on the first header update. A build that reads
/// only version 2 refuses a version-3 header: it would not know that a re-key is under way.
pub const VERSION: u16 = 3;
/// The oldest format version read.
pub const MIN_VERSION: u16 = 1;
/// The only cipher.
pub const CIPHER: &str = "aes-xts-plain64";

/// Scratch or persistent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    /// Service-managed key; the key is destroyed with the volume.
    Scratch,
    /// A KMS key the user picks.
    Persistent,
}

impl VolumeType {
    fn code(self) -> u8 {
        match self {
            VolumeType::Scratch => 1,
            VolumeType::Persistent => 2,
        }
    }
}

impl std::fmt::Display for VolumeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeType::Scratch => "scratch",
            VolumeType::Persistent => "persistent",
        })
    }
}

/// One header copy's contents.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// Incremented on every update.
    pub sequence: u64,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume name.
    pub name: String,
    /// Scratch or persistent.
    pub volume_type: VolumeType,
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u16,
    /// Discards on.
    pub discards: bool,
    /// Crypto-shredded: the wrapped key is gone and the volume can never be served again.
    pub deleted: bool,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Which key service wrapped the key (`local`, `aws`).
    pub kms: String,
    /// The KMS key (ID or ARN) that wrapped the data key.
    pub key_id: String,
    /// The wrapped data key (opaque KMS ciphertext blob; empty once deleted).
    pub wrapped_key: Vec<u8>,
    /// The encryption context bound to the wrapped key, as sorted `(key, value)` pairs.
    pub context: Vec<(String, String)>,
    /// Key-check value: proves a candidate data key is the right one without revealing it.
    pub key_check: [u8; 32],
    /// Creation has not finished (interrupted `volume create --preallocate`): never served.
    pub incomplete: bool,
    /// Bytes of the data area that the unfinished operation has completed (its checkpoint).
    pub progress: u64,
    /// Who is serving the volume, if anyone ([`Lease`]).
    pub lease: Option<Lease>,
    /// A `volume reencrypt` under way: the new data key, wrapped ([`Rekey`]).
    pub rekey: Option<Rekey>,
}

/// An unfinished `volume reencrypt`: sectors below its checkpoint (kept in the re-key journal
/// of the reserved area, `volume::reencrypt`) are under this key, the rest under the header's
/// own key. The volume is not served until the job finishes.
#[derive(Clone, PartialEq, Eq)]
pub struct Rekey {
    /// The KMS key that wrapped the new data key.
    pub key_id: String,
    /// The new data key, wrapped (KMS ciphertext blob).
    pub wrapped_key: Vec<u8>,
    /// The new key's key-check value.
    pub key_check: [u8; 32],
    /// Random id of the job: journal records of another job are ignored.
    pub job: u64,
    /// When the job started, Unix seconds.
    pub started: u64,
}

impl std::fmt::Debug for Rekey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekey")
            .field("key_id", &self.key_id)
            .field("wrapped_key_bytes", &self.wrapped_key.len())
            .field("job", &self.job)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// The serving lease: which process on which node serves (writes) the volume. Renewed by a
/// heartbeat while serving and cleared at clean shutdown; a lease whose heartbeat is older
/// than three intervals is stale (its holder died) and may be taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Host name of the serving node.
    pub node: String,
    /// Process id on that node.
    pub pid: u32,
    /// Random id of the serving process: tells a renewal whether the lease is still its own.
    pub owner: u64,
    /// When serving started, Unix seconds.
    pub started: u64,
    /// Last renewal, Unix milliseconds.
    pub heartbeat_ms: u64,
    /// Renewal interval, milliseconds.
    pub interval_ms: u32,
}

impl Lease {
    /// Milliseconds since the last heartbeat at `now_ms` (0 if the clocks disagree).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.heartbeat_ms)
    }

    /// Stale: no heartbeat for three intervals.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) > 3 * u64::from(self.interval_ms)
    }
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on node {} (serving since {})",
            self.pid,
            self.node,
            crate::human::utc_timestamp(self.started)
        )
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The blob is ciphertext, but it has no business in logs either.
        f.debug_struct("Header")
            .field("sequence", &self.sequence)
            .field("name", &self.name)
            .field("type", &self.volume_type)
            .field("size", &self.size)
            .field("sector_size", &self.sector_size)
            .field("deleted", &self.deleted)
            .field("kms", &self.kms)
            .field("key_id", &self.key_id)
            .field("wrapped_key_bytes", &self.wrapped_key.len())
            .field("incomplete", &self.incomplete)
            .field("lease", &self.lease)
            .field("rekey", &self.rekey)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a header copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not an nbdcrypt header.
    #[error("no nbdcrypt header (bad magic)")]
    Magic,
    /// A version this build does not read.
    #[error("header version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    /// The checksum does not match: the copy is damaged.
    #[error("header checksum mismatch (damaged copy)")]
    Checksum,
    /// A field is malformed.
    #[error("malformed header: {0}")]
    Malformed(String),
    /// The bytes end early or a length field lies.
    #[error("malformed header: {0}")]
    Decode(#[from] DecodeError),
    /// The header does not fit its 4 KiB slot.
    #[error("header of {0} bytes does not fit in {HEADER_COPY_BYTES}")]
    TooLarge(usize),
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) -> Result<(), HeaderError> {
    let len = u16::try_from(b.len()).map_err(|_| HeaderError::TooLarge(b.len()))?;
    out.put_u16(len);
    out.extend_from_slice(b);
    Ok(())
}

fn get_bytes16<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], HeaderError> {
    let len = r.u16()?;
    Ok(r.take(usize::from(len))?)
}

fn get_string16(r: &mut Reader<'_>) -> Result<String, HeaderError> {
    String::from_utf8(get_bytes16(r)?.to_vec())
        .map_err(|_| HeaderError::Malformed("string is not UTF-8".into()))
}

impl Header {
    /// The volume UUID in hex (as the registry and the KMS context hold it).
    pub fn uuid_hex(&self) -> String {
        crate::codec::to_hex(&self.uuid)
    }

    /// The full 4 KiB slot for this copy (zero padded, checksummed).
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(HEADER_COPY_BYTES);
        out.extend_from_slice(&MAGIC);
        out.put_u16(VERSION);
        out.put_u16(0);
        out.put_u32(0); // body length, patched below
        out.put_u64(self.sequence);
        out.extend_from_slice(&self.uuid);
        out.push(self.volume_type.code());
        out.push(
            u8::from(self.discards)
                | (u8::from(self.deleted) << 1)
                | (u8::from(self.incomplete) << 2),
        );
        out.put_u16(self.sector_size);
        out.put_u64(self.size);
        out.put_u64(DATA_OFFSET);
        out.put_u64(self.created);
        put_bytes16(&mut out, self.name.as_bytes())?;
        put_bytes16(&mut out, CIPHER.as_bytes())?;
        put_bytes16(&mut out, self.kms.as_bytes())?;
        put_bytes16(&mut out, self.key_id.as_bytes())?;
        put_bytes16(&mut out, &self.wrapped_key)?;
        out.put_u16(
            u16::try_from(self.context.len())
                .map_err(|_| HeaderError::TooLarge(self.context.len()))?,
        );
        for (k, v) in &self.context {
            put_bytes16(&mut out, k.as_bytes())?;
            put_bytes16(&mut out, v.as_bytes())?;
        }
        out.extend_from_slice(&self.key_check);
        // Version 2 from here.
        out.put_u64(self.progress);
        match &self.lease {
            None => out.push(0),
            Some(l) => {
                out.push(1);
                put_bytes16(&mut out, l.node.as_bytes())?;
                out.put_u32(l.pid);
                out.put_u64(l.owner);
                out.put_u64(l.started);
                out.put_u64(l.heartbeat_ms);
                out.put_u32(l.interval_ms);
            }
        }
        // Version 3 from here.
        match &self.rekey {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                put_bytes16(&mut out, r.key_id.as_bytes())?;
                put_bytes16(&mut out, &r.wrapped_key)?;
                out.extend_from_slice(&r.key_check);
                out.put_u64(r.job);
                out.put_u64(r.started);
            }
        }
        let body = out.len() + 4;
        if body > HEADER_COPY_BYTES {
            return Err(HeaderError::TooLarge(body));
        }
        out[12..16].copy_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
        let crc = crc32fast::hash(&out);
        out.put_u32(crc);
        out.resize(HEADER_COPY_BYTES, 0);
        Ok(out)
    }

    /// Parses one 4 KiB slot.
    pub fn decode(slot: &[u8]) -> Result<Header, HeaderError> {
        if slot.len() < 16 || slot[..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let mut r = Reader::new(&slot[8..]);
        let version = r.u16()?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        r.u16()?;
        let body = r.u32()? as usize;
        if !(64..=slot.len().min(HEADER_COPY_BYTES)).contains(&body) {
            return Err(HeaderError::Malformed(format!("body length {body}")));
        }
        let stored = u32::from_be_bytes([
            slot[body - 4],
            slot[body - 3],
            slot[body - 2],
            slot[body - 1],
        ]);
        if crc32fast::hash(&slot[..body - 4]) != stored {
            return Err(HeaderError::Checksum);
        }
        let mut r = Reader::new(&slot[16..body - 4]);
        let sequence = r.u64()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.take(16)?);
        let volume_type = match r.take(1)?[0] {
            1 => VolumeType::Scratch,
            2 => VolumeType::Persistent,
            t => return Err(HeaderError::Malformed(format!("volume type {t}"))),
        };
        let flags = r.take(1)?[0];
        let known = if version >= 2 { 0b111 } else { 0b11 };
        if flags & !known != 0 {
            return Err(HeaderError::Malformed(format!("flags {flags:#04x}")));
        }
        let sector_size = r.u16()?;
        let size = r.u64()?;
        let data_offset = r.u64()?;
        if data_offset != DATA_OFFSET {
            return Err(HeaderError::Malformed(format!("data offset {data_offset}")));
        }
        let created = r.u64()?;
        let name = get_string16(&mut r)?;
        let cipher = get_string16(&mut r)?;
        if cipher != CIPHER {
            return Err(HeaderError::Malformed(format!("cipher {cipher:?}")));
        }
        let kms = get_string16(&mut r)?;
        let key_id = get_string16(&mut r)?;
        let wrapped_key = get_bytes16(&mut r)?.to_vec();
        let n = r.u16()?;
        let mut context = Vec::new();
        for _ in 0..n {
            context.push((get_string16(&mut r)?, get_string16(&mut r)?));
        }
        let mut key_check = [0u8; 32];
        key_check.copy_from_slice(r.take(32)?);
        let (progress, lease) = if version >= 2 {
            let progress = r.u64()?;
            let lease = match r.take(1)?[0] {
                0 => None,
                1 => Some(Lease {
                    node: get_string16(&mut r)?,
                    pid: r.u32()?,
                    owner: r.u64()?,
                    started: r.u64()?,
                    heartbeat_ms: r.u64()?,
                    interval_ms: r.u32()?,
                }),
                t => return Err(HeaderError::Malformed(format!("lease tag {t}"))),
            };
            (progress, lease)
        } else {
            (0, None)
        };
        let rekey = if version >= 3 {
            match r.take(1)?[0] {
                0 => None,
                1 => {
                    let key_id = get_string16(&mut r)?;
                    let wrapped_key = get_bytes16(&mut r)?.to_vec();
                    let mut key_check = [0u8; 32];
                    key_check.copy_from_slice(r.take(32)?);
                    Some(Rekey {
                        key_id,
                        wrapped_key,
                        key_check,
                        job: r.u64()?,
                        started: r.u64()?,
                    })
                }
                t => return Err(HeaderError::Malformed(format!("rekey tag {t}"))),
            }
        } else {
            None
        };
        r.finish()?;
        Ok(Header {
            sequence,
            uuid,
            name,
            volume_type,
            size,
            sector_size,
            discards: flags & 1 != 0,
            deleted: flags & 2 != 0,
            created,
            kms,
            key_id,
            wrapped_key,
            context,
            key_check,
            incomplete: flags & 4 != 0,
            progress,
            lease,
            rekey,
        })
    }
}

/// The result of reading both copies.
#[derive(Debug)]
pub struct Loaded {
    /// The newest valid copy.
    pub header: Header,
    /// Which slot it came from.
    pub slot: usize,
    /// Problems with the other copy, if any (it will be rewritten on the next update).
    pub damaged: Option<HeaderError>,
}

/// Picks the newest valid copy from the two slots.
pub fn choose(slots: [&[u8]; HEADER_COPIES]) -> Result<Loaded, [HeaderError; HEADER_COPIES]> {
    let a = Header::decode(slots[0]);
    let b = Header::decode(slots[1]);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.sequence >= b.sequence {
                Ok(Loaded {
                    header: a,
                    slot: 0,
                    damaged: None,
                })
            } else {
                Ok(Loaded {
                    header: b,
                    slot: 1,
                    damaged: None,
                })
            }
        }
        (Ok(a), Err(e)) => Ok(Loaded {
            header: a,
            slot: 0,
            damaged: Some(e),
        }),
        (Err(e), Ok(b)) => Ok(Loaded {
            header: b,
            slot: 1,
            damaged: Some(e),
        }),
        (Err(ea), Err(eb)) => Err([ea, eb]),
    }
}

/// The slot an update of `current` (read from `slot`) must write: always the other one.
pub fn next_slot(slot: usize) -> usize {
    1 - slot
}

#[cfg(test)]
mod tests;
