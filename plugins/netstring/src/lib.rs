//! A `custom://` protocol in a few lines: netstrings (`<length>:<data>,`,
//! e.g. `5:hello,`). The host keeps buffers, limits and IO; this plugin only
//! says where a packet ends, where its message is, and how to frame a reply.
//! Each message is echoed back, framed the same way.
//!
//! ```toml
//! [[worker]]
//! name = "netstring"
//! listen = "custom://127.0.0.1:2350"
//! plugin = "target/debug/libnetstring_plugin.so"
//! ```

use plugin_api::{export_plugin, ConnId, Context, Plugin, Protocol};

/// Lengths longer than this many digits cannot be valid (over 4 GiB).
const MAX_DIGITS: usize = 10;

#[derive(Default)]
pub struct Netstring;

impl Protocol for Netstring {
    fn input(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > MAX_DIGITS {
            return Err("netstring length too long".into());
        }
        match buf.get(digits) {
            None => return Ok(None),
            Some(b':') if digits > 0 => {}
            Some(_) => {
                return Err(format!(
                    "netstring must start with <digits>:, got {:?}",
                    &buf[..=digits]
                ))
            }
        }
        let len: usize = std::str::from_utf8(&buf[..digits])
            .unwrap_or("0")
            .parse()
            .map_err(|_| "bad length")?;
        let total = digits + 1 + len + 1;
        match buf.get(total - 1) {
            None => Ok(Some(total)), // the host waits until `total` bytes are there
            Some(b',') => Ok(Some(total)),
            Some(_) => Err("netstring must end with ','".into()),
        }
    }

    fn decode<'a>(&mut self, packet: &'a [u8]) -> &'a [u8] {
        let colon = packet.iter().position(|&b| b == b':').unwrap_or(0);
        &packet[colon + 1..packet.len() - 1]
    }

    fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{}:", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.push(b',');
    }
}

#[derive(Default)]
pub struct NetstringEcho;

impl Plugin for NetstringEcho {
    fn protocol(&mut self) -> Option<Box<dyn Protocol>> {
        Some(Box::new(Netstring))
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
}

export_plugin!(NetstringEcho);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_packets_and_refuses_garbage() {
        let mut n = Netstring;
        assert_eq!(
            n.input(b"5:hel"),
            Ok(Some(8)),
            "length known before the body"
        );
        assert_eq!(n.input(b"5:hello,rest"), Ok(Some(8)));
        assert_eq!(n.input(b"12"), Ok(None));
        assert_eq!(n.decode(b"5:hello,"), b"hello");
        assert_eq!(n.decode(b"0:,"), b"");
        assert!(n.input(b"x:").is_err());
        assert!(n.input(b":").is_err());
        assert!(n.input(b"3:abc;").is_err());
        assert!(n.input(b"99999999999:").is_err());
        let mut out = Vec::new();
        n.encode(b"hi", &mut out);
        assert_eq!(out, b"2:hi,");
    }
}
