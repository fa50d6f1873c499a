//! What is already on a backing store before `volume create` writes to it: our own header, a
//! file system or partition table, or any data at all. Pure: works on the bytes read from the
//! start (and, where the store is larger, the end) of the store.

use super::header::{self, HEADER_COPY_BYTES};

/// Bytes examined at the start of the store (and at its end).
pub const PROBE_BYTES: usize = 1 << 20;

/// What a store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing: zero length, or zeroes wherever we looked.
    Empty,
    /// An nbdcrypt volume header.
    Nbdcrypt {
        /// The volume name in the header.
        name: String,
        /// The header says the volume was deleted (crypto-shredded).
        deleted: bool,
    },
    /// A known signature (file system, partition table, LUKS, swap…).
    Signature(&'static str),
    /// Non-zero bytes with no known signature.
    Data {
        /// Offset of the first non-zero byte.
        offset: u64,
    },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Empty => f.write_str("nothing"),
            Found::Nbdcrypt {
                name,
                deleted: false,
            } => write!(f, "an nbdcrypt volume header (volume {name:?})"),
            Found::Nbdcrypt {
                name,
                deleted: true,
            } => write!(
                f,
                "the header of deleted nbdcrypt volume {name:?} (its key is destroyed)"
            ),
            Found::Signature(what) => write!(f, "{what}"),
            Found::Data { offset } => write!(f, "data (a non-zero byte at offset {offset})"),
        }
    }
}

/// `(offset, magic, what)`: signatures `blkid` would also recognise, at fixed offsets from
/// the start of the store.
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (0, b"SKUL\xba\xbe", "a LUKS2 secondary header"),
    (0, b"XFSB", "an XFS file system"),
    (0x438, &[0x53, 0xef], "an ext2/ext3/ext4 file system"),
    (0x10040, b"_BHRfS_M", "a btrfs file system"),
    (512, b"EFI PART", "a GPT partition table"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (4086, b"SWAP-SPACE", "a swap area"),
    (0x8001, b"CD001", "an ISO 9660 image"),
    (0, b"QFI\xfb", "a qcow2 image"),
    (
        0x1000,
        &[0xfc, 0x4e, 0x2b, 0xa9],
        "a Linux RAID (md) member",
    ),
    (0x52, b"FAT32   ", "a FAT32 file system"),
    (0x36, b"FAT16   ", "a FAT file system"),
    (0x36, b"FAT12   ", "a FAT file system"),
    (3, b"NTFS    ", "an NTFS file system"),
    (0x218, b"LVM2 001", "an LVM physical volume"),
];

/// What `head` (the first bytes of the store, up to [`PROBE_BYTES`]) and `tail` (its last
/// bytes, empty when the store is no longer than `head`) show.
pub fn examine(head: &[u8], tail: &[u8]) -> Found {
    if head.len() >= 2 * HEADER_COPY_BYTES {
        let (a, b) = head[..2 * HEADER_COPY_BYTES].split_at(HEADER_COPY_BYTES);
        if let Ok(l) = header::choose([a, b]) {
            return Found::Nbdcrypt {
                name: l.header.name,
                deleted: l.header.deleted,
            };
        }
    }
    if head.starts_with(&header::MAGIC) {
        return Found::Signature("a damaged nbdcrypt volume header");
    }
    for &(at, magic, what) in SIGNATURES {
        if head.get(at..at + magic.len()) == Some(magic) {
            return Found::Signature(what);
        }
    }
    if head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        return Found::Signature("a DOS partition table or boot sector");
    }
    if let Some(i) = head.iter().position(|&b| b != 0) {
        return Found::Data { offset: i as u64 };
    }
    if tail.iter().any(|&b| b != 0) {
        return Found::Signature(
            "data near the end of the store (e.g. a backup GPT or RAID superblock)",
        );
    }
    Found::Empty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_zeroes_are_empty_and_any_byte_is_data() {
        let mut head = vec![0u8; PROBE_BYTES];
        assert_eq!(examine(&head, &[]), Found::Empty);
        head[700_000] = 1;
        assert_eq!(examine(&head, &[]), Found::Data { offset: 700_000 });
        assert!(matches!(examine(&[0; 10], &[0, 0, 9]), Found::Signature(_)));
    }

    #[test]
    fn probe_recognises_file_systems_and_tables() {
        let mut ext4 = vec![0u8; 4096];
        ext4[0x438] = 0x53;
        ext4[0x439] = 0xef;
        assert_eq!(
            examine(&ext4, &[]),
            Found::Signature("an ext2/ext3/ext4 file system")
        );
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert!(matches!(examine(&mbr, &[]), Found::Signature(s) if s.contains("DOS")));
        let mut luks = vec![0u8; 4096];
        luks[..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(examine(&luks, &[]), Found::Signature("a LUKS header"));
    }
}
