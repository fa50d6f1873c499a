//! The handshake and option parser: arbitrary client bytes through the real negotiation
//! (fixed newstyle, every option, STARTTLS, INFO/GO, meta contexts), and every handshake
//! message decoder on the raw input. Must never panic or hang.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use nbdcrypt::protocol::handshake::{
    Greeting, Info, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader,
};

fuzz_target!(|data: &[u8]| {
    let _ = Greeting::decode(data);
    let _ = OptionHeader::decode(data);
    let _ = InfoRequest::decode(data);
    let _ = MetaContextRequest::decode(data);
    let _ = OptionReplyHeader::decode(data);
    let _ = Info::decode(data);
    let exports = common::exports();
    common::drive(data, |mut server| async move {
        let _ = nbdcrypt::server::negotiate::negotiate(&mut server, &exports).await;
    });
});
