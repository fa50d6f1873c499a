//! The handshake and option parser: arbitrary client bytes through the real negotiation
//! (fixed newstyle, every option, STARTTLS, INFO/GO, meta contexts), and every handshake
//! message decoder on the raw input. The first byte picks the TLS mode (off, offered, required,
//! inside TLS): the option gating (`ERR_TLS_REQD`, `STARTTLS` acknowledgement) is fuzzed too;
//! a `STARTTLS` acknowledgement ends the round, as it does before the real TLS handshake.
//! Must never panic or hang.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use nbdcrypt::server::negotiate::TlsState;
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
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tls = TlsState {
        offered: mode & 1 != 0,
        required: mode & 2 != 0,
        active: mode & 4 != 0,
    };
    common::drive(rest, |mut server| async move {
        use nbdcrypt::server::negotiate::{greet, haggle};
        if let Ok(no_zeroes) = greet(&mut server).await {
            let _ = haggle(&mut server, &exports, no_zeroes, tls).await;
        }
    });
});
