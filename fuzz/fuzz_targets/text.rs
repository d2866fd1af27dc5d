//! `text://`: lines, `\r\n` or `\n`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wm_proto::{Codec, Scheme};
use wm_proto_fuzz::{Input, OnUpgrade};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    input.check(|| Codec::new(Scheme::Text), None, OnUpgrade::Accept);
});
