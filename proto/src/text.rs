//! `text://`: one message per line. `\n` ends a message, a `\r` before it is
//! dropped, and `send` appends `\n` (Workerman's Text protocol).

use serde::{Deserialize, Serialize};

use super::{Message, ProtocolError};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TextDecoder {
    /// Bytes at the start of the input already known to hold no `\n`, so a
    /// long line arriving in many reads is scanned once, not once per read.
    scanned: usize,
}

impl TextDecoder {
    #[inline]
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        max: usize,
    ) -> Result<Option<Message>, ProtocolError> {
        let from = self.scanned.min(input.len());
        match input[from..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let nl = from + i;
                // The limit counts the whole packet, delimiter included.
                if nl + 1 > max {
                    return Err(ProtocolError::TooLarge { size: nl + 1, max });
                }
                let end = if nl > 0 && input[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                // The caller takes the message off the front: the rest is unscanned.
                self.scanned = 0;
                Ok(Some(Message {
                    start: 0,
                    end,
                    consumed: nl + 1,
                }))
            }
            None if input.len() >= max => Err(ProtocolError::TooLarge {
                size: input.len(),
                max,
            }),
            None => {
                self.scanned = input.len();
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tests::feed, Codec, ProtocolError};
    use crate::Scheme;

    fn text() -> Codec {
        Codec::new(Scheme::Text)
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let got = feed(&mut text(), &[b"hello\nwor", b"ld\r\n\n"], 100).unwrap();
        assert_eq!(
            got,
            vec![b"hello".to_vec(), b"world".to_vec(), b"".to_vec()]
        );
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let input = b"one\r\ntwo\nthree\n";
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let a = feed(&mut text(), &chunks, 100).unwrap();
        let b = feed(&mut text(), &[input], 100).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn lone_cr_inside_a_line_is_kept() {
        let got = feed(&mut text(), &[b"a\rb\n"], 100).unwrap();
        assert_eq!(got, vec![b"a\rb".to_vec()]);
    }

    #[test]
    fn oversize_line_is_an_error_with_or_without_newline() {
        let err = feed(&mut text(), &[b"0123456789"], 10).unwrap_err();
        assert_eq!(err, ProtocolError::TooLarge { size: 10, max: 10 });
        let err = feed(&mut text(), &[b"012345678901\n"], 10).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }));
        // Exactly at the limit, delimiter included, is allowed.
        assert_eq!(feed(&mut text(), &[b"012345678\n"], 10).unwrap().len(), 1);
    }
}
