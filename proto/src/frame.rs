//! `frame://`: a 4-byte big-endian length that counts the header itself,
//! then the payload (Workerman's Frame: "jhdxr" is `00 00 00 09 jhdxr`).

use super::{Message, ProtocolError};

const HEADER: usize = 4;

#[inline]
pub fn decode(input: &[u8], max: usize) -> Result<Option<Message>, ProtocolError> {
    let Some(head) = input.first_chunk::<HEADER>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*head);
    // Workerman stalls on 0 and yields empty packets for 1..3; both are errors.
    if (len as usize) < HEADER {
        return Err(ProtocolError::BadFrameLength(len));
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { size: len, max });
    }
    if input.len() < len {
        return Ok(None);
    }
    Ok(Some(Message {
        start: HEADER,
        end: len,
        consumed: len,
    }))
}

pub fn header(payload: usize) -> Result<[u8; 4], ProtocolError> {
    let total = payload + HEADER;
    let n = u32::try_from(total).map_err(|_| ProtocolError::TooLarge {
        size: total,
        max: u32::MAX as usize,
    })?;
    Ok(n.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::{tests::feed, Codec, ProtocolError};
    use super::*;
    use crate::Scheme;

    fn framed(p: &[u8]) -> Vec<u8> {
        let mut v = header(p.len()).unwrap().to_vec();
        v.extend_from_slice(p);
        v
    }

    #[test]
    fn workerman_example_bytes() {
        assert_eq!(framed(b"jhdxr"), b"\x00\x00\x00\x09jhdxr");
    }

    #[test]
    fn partial_and_coalesced_frames() {
        let mut all = framed(b"first");
        all.extend(framed(b""));
        all.extend(framed(b"third message"));
        let chunks: Vec<&[u8]> = all.chunks(3).collect();
        let got = feed(&mut Codec::new(Scheme::Frame), &chunks, 100).unwrap();
        assert_eq!(
            got,
            vec![b"first".to_vec(), b"".to_vec(), b"third message".to_vec()]
        );
        let got = feed(&mut Codec::new(Scheme::Frame), &[&all], 100).unwrap();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn lengths_below_header_are_errors() {
        for n in 0u32..4 {
            let err = decode(&n.to_be_bytes(), 100).unwrap_err();
            assert_eq!(err, ProtocolError::BadFrameLength(n));
        }
    }

    #[test]
    fn oversize_is_refused_before_the_body_arrives() {
        let err = decode(&1000u32.to_be_bytes(), 100).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::TooLarge {
                size: 1000,
                max: 100
            }
        );
    }
}
