//! The NBD wire format, pure: bytes in, values out, and back. No sockets, no tokio, no volume.
//!
//! Everything follows NetworkBlockDevice/nbd `doc/proto.md` (fixed newstyle negotiation, compact
//! request headers, simple and structured replies). Unknown option codes, command types, flags
//! and info types are representable as plain integers, so the server can answer them per spec
//! instead of failing to parse. Decoding never panics: short, long or malformed input is a
//! [`DecodeError`]. Support status of every option, command and flag is in
//! `docs/protocol-support.md`.

pub use crate::codec;
pub mod consts;
pub mod handshake;
pub mod transmission;

pub use codec::{DecodeError, Reader};
pub use handshake::{
    Greeting, Info, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader,
};
pub use transmission::{ChunkHeader, Request, SimpleReply};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/._ -]{0,40}"
    }

    proptest! {
        #[test]
        fn request_roundtrips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            let mut b = Vec::new();
            r.encode(&mut b);
            prop_assert_eq!(b.len(), transmission::REQUEST_LEN);
            prop_assert_eq!(Request::decode(&b).unwrap(), r);
        }

        #[test]
        fn option_header_roundtrips(code: u32, len: u32) {
            let h = OptionHeader { code, len };
            let mut b = Vec::new();
            h.encode(&mut b);
            prop_assert_eq!(OptionHeader::decode(&b).unwrap(), h);
        }

        #[test]
        fn option_reply_header_roundtrips(option: u32, reply_type: u32, len: u32) {
            let h = OptionReplyHeader { option, reply_type, len };
            let mut b = Vec::new();
            h.encode(&mut b);
            prop_assert_eq!(OptionReplyHeader::decode(&b).unwrap(), h);
        }

        #[test]
        fn info_request_roundtrips(name in arb_string(), requests in prop::collection::vec(any::<u16>(), 0..10)) {
            let r = InfoRequest { name, requests };
            let mut b = Vec::new();
            r.encode(&mut b);
            prop_assert_eq!(InfoRequest::decode(&b).unwrap(), r);
        }

        #[test]
        fn meta_context_request_roundtrips(name in arb_string(), queries in prop::collection::vec(arb_string(), 0..5)) {
            let r = MetaContextRequest { name, queries };
            let mut b = Vec::new();
            r.encode(&mut b);
            prop_assert_eq!(MetaContextRequest::decode(&b).unwrap(), r);
        }

        #[test]
        fn info_roundtrips(size: u64, flags: u16, min: u32, preferred: u32, max: u32, s in arb_string(), kind in 4u16.., data in prop::collection::vec(any::<u8>(), 0..20)) {
            for i in [
                Info::Export { size, flags },
                Info::Name(s.clone()),
                Info::Description(s.clone()),
                Info::BlockSize { min, preferred, max },
                Info::Unknown { kind, data: data.clone() },
            ] {
                let mut b = Vec::new();
                i.encode(&mut b);
                prop_assert_eq!(Info::decode(&b).unwrap(), i);
            }
        }

        #[test]
        fn replies_roundtrip(error: u32, cookie: u64, flags: u16, kind: u16, length: u32) {
            let s = SimpleReply { error, cookie };
            let mut b = Vec::new();
            s.encode(&mut b);
            prop_assert_eq!(SimpleReply::decode(&b).unwrap(), s);
            let c = ChunkHeader { flags, kind, cookie, length };
            let mut b = Vec::new();
            c.encode(&mut b);
            prop_assert_eq!(ChunkHeader::decode(&b).unwrap(), c);
        }

        #[test]
        fn greeting_roundtrips(flags: u16) {
            let g = Greeting { flags };
            let mut b = Vec::new();
            g.encode(&mut b);
            prop_assert_eq!(b.len(), handshake::GREETING_LEN);
            prop_assert_eq!(Greeting::decode(&b).unwrap(), g);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = Request::decode(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = InfoRequest::decode(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let _ = Info::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = ChunkHeader::decode(&bytes);
            let _ = Greeting::decode(&bytes);
        }

        #[test]
        fn lying_lengths_are_errors(len in 5u32.., name in arb_string()) {
            // A name length that claims more bytes than the option carries.
            let mut b = Vec::new();
            codec::Put::put_u32(&mut b, len.max(u32::try_from(name.len()).unwrap() + 1));
            b.extend_from_slice(name.as_bytes());
            prop_assert!(InfoRequest::decode(&b).is_err());
            prop_assert!(MetaContextRequest::decode(&b).is_err());
        }
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut b = Vec::new();
        Request {
            flags: 0,
            kind: 0,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode(&mut b);
        b[0] ^= 1;
        assert!(matches!(
            Request::decode(&b),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn huge_query_count_does_not_preallocate() {
        // 2^32-1 queries announced, none present: an error, not an allocation of 100 GB.
        let mut b = Vec::new();
        codec::Put::put_string32(&mut b, "x");
        codec::Put::put_u32(&mut b, u32::MAX);
        assert!(MetaContextRequest::decode(&b).is_err());
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        let mut a = Vec::new();
        handshake::export_name_reply(&mut a, 1 << 30, 3, false);
        assert_eq!(a.len(), 134);
        let mut b = Vec::new();
        handshake::export_name_reply(&mut b, 1 << 30, 3, true);
        assert_eq!(b.len(), 10);
    }
}
