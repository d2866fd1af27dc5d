//! `custom://`: the host's glue around a plugin's framing, with netstrings
//! (`5:hello,`) or, with flag 1, a 2-byte length prefix as the framer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wm_proto::{Codec, Framer, Scheme};
use wm_proto_fuzz::{Input, LengthPrefix, Netstring, OnUpgrade};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let framer: &dyn Framer = if input.flags & 1 == 0 {
        &Netstring
    } else {
        &LengthPrefix
    };
    input.check(
        || Codec::new(Scheme::Custom),
        Some(framer),
        OnUpgrade::Accept,
    );
});
