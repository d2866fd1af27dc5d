//! `http://`: pipelined requests through the codec (flag 1 clear), or
//! through the request decoder with a small header limit (flag 1 set; flags
//! 2 and 4 pick it), which the codec always leaves at 16 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wm_proto::http::Limits;
use wm_proto::{Codec, Scheme};
use wm_proto_fuzz::{drive_http, Input, OnUpgrade};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    if input.flags & 1 == 0 {
        input.check(|| Codec::new(Scheme::Http), None, OnUpgrade::Accept);
        return;
    }
    let limits = Limits {
        max_header_bytes: [16, 64, 256, 4096][(input.flags >> 1 & 3) as usize],
        max_body_bytes: input.max,
    };
    let whole = drive_http(&[input.bytes], &limits);
    let split = drive_http(&input.chunks(input.bytes), &limits);
    assert_eq!(whole, split, "requests differ whole and cut into reads");
});
