//! `websocket://`, server side: the upgrade request, then masked frames.
//! Flag 1: start past the handshake (frames only); flag 2: the application
//! refuses the upgrade (403) instead of accepting it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wm_proto::websocket::{Role, WsCodec};
use wm_proto::{Codec, Scheme};
use wm_proto_fuzz::{Input, OnUpgrade};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let open = input.flags & 1 != 0;
    let new = || match open {
        true => Codec::Websocket(Box::new(WsCodec::open(Role::Server))),
        false => Codec::new(Scheme::Websocket),
    };
    let on_upgrade = match input.flags & 2 {
        0 => OnUpgrade::Accept,
        _ => OnUpgrade::Refuse(403),
    };
    input.check(new, None, on_upgrade);
});
