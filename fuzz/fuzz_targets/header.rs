//! The volume header parser: the raw input as a 4 KiB slot, and the input as the body of a slot
//! with a valid magic, version, length and checksum (so the field parser behind the checksum
//! is reached). Must never panic; anything that parses must re-encode and parse back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdcrypt::volume::header::{Header, MAGIC, VERSION};

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    if data.len() > 4096 - 20 {
        return;
    }
    let mut slot = Vec::with_capacity(4096);
    slot.extend_from_slice(&MAGIC);
    slot.extend_from_slice(&VERSION.to_be_bytes());
    slot.extend_from_slice(&0u16.to_be_bytes());
    let body = u32::try_from(16 + data.len() + 4).unwrap_or(u32::MAX);
    slot.extend_from_slice(&body.to_be_bytes());
    slot.extend_from_slice(data);
    let crc = crc32fast::hash(&slot);
    slot.extend_from_slice(&crc.to_be_bytes());
    slot.resize(4096, 0);
    if let Ok(h) = Header::decode(&slot) {
        let again = h.encode().expect("a parsed header re-encodes");
        let back = Header::decode(&again).expect("a re-encoded header parses");
        assert_eq!(format!("{back:?}"), format!("{h:?}"));
    }
});
