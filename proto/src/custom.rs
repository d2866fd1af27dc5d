//! `custom://`: framing by the plugin's `Protocol`, lent by the worker as a
//! [`Framer`]; the host still enforces `max_package_size`.

use super::{Framer, Message, ProtocolError};

fn framer(f: Option<&dyn Framer>) -> Result<&dyn Framer, ProtocolError> {
    f.ok_or_else(|| ProtocolError::Custom("custom:// without the plugin's protocol".into()))
}

/// Finds the next packet at the start of `input`.
pub fn decode(
    f: Option<&dyn Framer>,
    input: &[u8],
    max: usize,
) -> Result<Option<Message>, ProtocolError> {
    if input.is_empty() {
        return Ok(None);
    }
    let f = framer(f)?;
    let bad = |s: String| Err(ProtocolError::Custom(s));
    match f.packet_len(input).map_err(ProtocolError::Custom)? {
        Some(0) => bad("the protocol reported an empty packet".into()),
        Some(n) if n > max => bad(format!(
            "packet of {n} bytes is over max_package_size ({max})"
        )),
        Some(n) if n > input.len() => Ok(None),
        Some(n) => {
            let (start, end) = f.message(&input[..n]);
            // The offsets come from plugin code: out of the packet is the
            // plugin's error, never an out-of-bounds slice in the host.
            if start > end || end > n {
                return bad(format!(
                    "the protocol placed the message at {start}..{end} of a {n}-byte packet"
                ));
            }
            Ok(Some(Message {
                start,
                end,
                consumed: n,
            }))
        }
        None if input.len() >= max => bad(format!(
            "no complete packet in {} bytes (max_package_size {max})",
            input.len()
        )),
        None => Ok(None),
    }
}

pub fn encode(f: Option<&dyn Framer>, data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    framer(f)?
        .encode(data)
        .ok_or_else(|| ProtocolError::Custom("the plugin's protocol failed to encode".into()))
}
