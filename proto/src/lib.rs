//! Application protocols as pure codecs: bytes in, message boundaries out, no
//! sockets inside. The worker owns buffers and IO; a codec only says where the
//! next message is, and what to put around an outgoing one.

mod frame;
pub mod http;
mod scheme;
pub mod static_files;
mod text;
pub mod websocket;

pub use scheme::Scheme;

/// Where one complete message sits in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// The payload is `input[start..end]`.
    pub start: usize,
    pub end: usize,
    /// Bytes of input the message used up, framing included.
    pub consumed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {size} bytes is over max_package_size ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("frame length {0} is below the 4-byte header it must count")]
    BadFrameLength(u32),
}

/// Bytes written around a payload: a header before, a trailer after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    header: [u8; 10],
    header_len: u8,
    pub trailer: &'static [u8],
}

impl Envelope {
    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len as usize]
    }
}

/// Per-connection decoder state.
pub enum Codec {
    /// Each read is one message.
    Tcp,
    Text(text::TextDecoder),
    Frame,
    /// Before the handshake: `None`; after it, the frame reader.
    Websocket(Option<Box<websocket::WsReader>>),
    Http(Box<HttpConn>),
    /// Framed by the plugin's `Protocol` (the worker calls it).
    Custom,
    /// Our outbound websocket: before the server's 101, `None`.
    WsClient(Option<Box<websocket::WsReader>>),
}

/// An HTTP connection: the request decoder and the requests still owed an
/// answer, oldest first (answers go out in request order).
#[derive(Default)]
pub struct HttpConn {
    pub decoder: http::HttpDecoder,
    pub pending: std::collections::VecDeque<Pending>,
}

#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub keep_alive: bool,
    /// A HEAD request: answer with headers only.
    pub head: bool,
}

/// The framing of one outgoing message where the protocol has a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Default,
    Text,
    Binary,
}

impl Codec {
    pub fn new(scheme: Scheme) -> Codec {
        match scheme {
            Scheme::Tcp => Codec::Tcp,
            Scheme::Text => Codec::Text(text::TextDecoder::default()),
            Scheme::Frame => Codec::Frame,
            Scheme::Websocket => Codec::Websocket(None),
            Scheme::Http => Codec::Http(Box::default()),
            Scheme::Custom => Codec::Custom,
        }
    }

    /// Finds the next complete message at the start of `input`.
    /// `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, input: &[u8], max: usize) -> Result<Option<Message>, ProtocolError> {
        match self {
            Codec::Tcp if input.is_empty() => Ok(None),
            Codec::Tcp => Ok(Some(Message {
                start: 0,
                end: input.len(),
                consumed: input.len(),
            })),
            Codec::Text(t) => t.decode(input, max),
            Codec::Frame => frame::decode(input, max),
            // These have their own paths in the worker.
            Codec::Websocket(_) | Codec::Http(_) | Codec::Custom | Codec::WsClient(_) => Ok(None),
        }
    }

    /// Tells the decoder that `n` bytes were taken off the front of its input,
    /// so a stateful decoder can keep its place.
    pub fn consumed(&mut self, n: usize) {
        if let Codec::Text(t) = self {
            t.consumed(n)
        }
    }

    /// What to write around a payload of `len` bytes.
    pub fn envelope(&self, len: usize, kind: Kind) -> Result<Envelope, ProtocolError> {
        let mut env = Envelope {
            header: [0; 10],
            header_len: 0,
            trailer: b"",
        };
        match self {
            // HTTP answers are whole responses, built by `http::encode_head`.
            // Custom framing is encoded by the plugin's protocol object.
            // Client frames are masked, so built whole by the sender.
            Codec::Tcp | Codec::Http(_) | Codec::Custom | Codec::WsClient(_) => {}
            Codec::Text(_) => env.trailer = b"\n",
            Codec::Frame => {
                env.header[..4].copy_from_slice(&frame::header(len)?);
                env.header_len = 4;
            }
            Codec::Websocket(_) => {
                let (h, n) = websocket::frame_header(len, kind == Kind::Binary);
                env.header = h;
                env.header_len = n as u8;
            }
        }
        Ok(env)
    }

    /// Whether the connection is past any handshake, so the plugin knows it.
    pub fn established(&self) -> bool {
        !matches!(self, Codec::Websocket(None) | Codec::WsClient(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one at a time, as reads would, and collects messages.
    pub(crate) fn feed(
        codec: &mut Codec,
        chunks: &[&[u8]],
        max: usize,
    ) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(m) = codec.decode(&buf, max)? {
                out.push(buf[m.start..m.end].to_vec());
                buf.drain(..m.consumed);
                codec.consumed(m.consumed);
            }
        }
        Ok(out)
    }

    #[test]
    fn tcp_takes_each_read_whole() {
        let mut c = Codec::new(Scheme::Tcp);
        let got = feed(&mut c, &[b"ab", b"c\n"], 100).unwrap();
        assert_eq!(got, vec![b"ab".to_vec(), b"c\n".to_vec()]);
        let e = c.envelope(3, Kind::Default).unwrap();
        assert!(e.header().is_empty() && e.trailer.is_empty());
    }

    #[test]
    fn envelopes_match_workerman_wire_formats() {
        let c = Codec::new(Scheme::Text);
        assert_eq!(c.envelope(5, Kind::Default).unwrap().trailer, b"\n");
        let c = Codec::new(Scheme::Frame);
        let e = c.envelope(5, Kind::Default).unwrap();
        assert_eq!(e.header(), [0, 0, 0, 9]);
        assert!(e.trailer.is_empty());
    }
}
