//! What the fuzz targets share: how an input is read (settings, then the
//! bytes of a connection), and the driver of `proto/tests/common`, which
//! feeds a codec as the worker does and checks every step.
//!
//! An input is `[settings, split, bytes...]`: the low four bits of
//! `settings` pick `max_package_size` from [`MAXES`], the high four are the
//! target's own flags; `split` says how `bytes` is cut into reads
//! ([`Input::chunks`]). Each target decodes `bytes` whole and cut, and the
//! two must give the same steps.

#[path = "../../proto/tests/common/mod.rs"]
mod common;

pub use common::*;

/// `max_package_size` values: tiny, at the websocket length boundaries, and
/// roomy.
pub const MAXES: [usize; 16] = [
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    16,
    64,
    125,
    126,
    127,
    1000,
    65535,
    65536,
    1 << 20,
];

pub struct Input<'a> {
    pub max: usize,
    /// The target's own switches.
    pub flags: u8,
    pub bytes: &'a [u8],
    split: u8,
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Input<'a>> {
        let [settings, split, bytes @ ..] = data else {
            return None;
        };
        Some(Input {
            max: MAXES[(settings & 0xf) as usize],
            flags: settings >> 4,
            bytes,
            split: *split,
        })
    }

    /// `bytes` (or another input of the same length) cut into reads of
    /// pseudo-random lengths up to `2^(split & 7)`; 0 is a byte at a time.
    pub fn chunks<'b>(&self, bytes: &'b [u8]) -> Vec<&'b [u8]> {
        let span = 1usize << (self.split & 7);
        let mut state = u32::from(self.split).wrapping_mul(0x9e37_79b9) | 1;
        let mut cuts = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            at += 1 + state as usize % span;
            cuts.push(at);
        }
        cut(bytes, &cuts)
    }

    /// Drives `new()` over the bytes whole and cut into reads: the step
    /// invariants hold for both, and both give the same steps.
    pub fn check(
        &self,
        new: impl Fn() -> wm_proto::Codec,
        framer: Option<&dyn wm_proto::Framer>,
        on_upgrade: OnUpgrade,
    ) -> Run {
        let chunks = self.chunks(self.bytes);
        assert_split_invariant(new, self.bytes, &chunks, self.max, framer, on_upgrade)
    }
}
