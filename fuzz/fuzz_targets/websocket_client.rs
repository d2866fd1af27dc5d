//! `websocket://`, client side: the server's answer to our handshake, then
//! unmasked frames. Each client has a fresh key, so `$ACCEPT` in the input
//! (its first one) stands for the accept value the codec expects. Flag 1: start past the
//! handshake (frames only).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wm_proto::websocket::{Role, WsCodec};
use wm_proto::Codec;
use wm_proto_fuzz::{drive, replace_first, ws_client, Input, OnUpgrade};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let new = || match input.flags & 1 {
        0 => ws_client(),
        // Past the handshake: the marker is left as it is.
        _ => (
            Codec::Websocket(Box::new(WsCodec::open(Role::Client))),
            "$ACCEPT".to_string(),
        ),
    };
    let ((mut a, accept_a), (mut b, accept_b)) = (new(), new());
    let bytes_a = replace_first(input.bytes, b"$ACCEPT", accept_a.as_bytes());
    let bytes_b = replace_first(input.bytes, b"$ACCEPT", accept_b.as_bytes());
    let whole = drive(&mut a, &[&bytes_a], input.max, None, OnUpgrade::Accept);
    let split = drive(
        &mut b,
        &input.chunks(&bytes_b),
        input.max,
        None,
        OnUpgrade::Accept,
    );
    assert_eq!(
        whole.normalized(),
        split.normalized(),
        "steps differ whole and cut into reads"
    );
    if whole.failed().is_none() {
        // Client frames carry fresh masks: only their lengths compare.
        assert_eq!(whole.replies.len(), split.replies.len(), "replies differ");
    }
});
