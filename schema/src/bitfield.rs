//! [`Bitfield`]: which chunks of a file a peer holds, and [`format_ranges`] for showing it.

use serde::{Deserialize, Serialize};

/// A set of chunk indices `0..len`, one bit each (most significant bit first in each byte).
///
/// Always well-formed: exactly `ceil(len / 8)` bytes, and no bit set past `len`. Decoding
/// refuses anything else (see [`InvalidBitfield`]), so one read from the network can be
/// indexed anywhere below `len` without a check.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "RawBitfield")]
pub struct Bitfield {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

/// A bitfield as it travels, before it is checked.
#[derive(Deserialize)]
struct RawBitfield {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

/// Why a decoded bitfield was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBitfield {
    #[error("bitfield of {len} chunks carries {bytes} bytes instead of {expected}")]
    WrongSize {
        len: u32,
        bytes: usize,
        expected: usize,
    },
    #[error("bitfield of {len} chunks has bits set past its end")]
    BitsPastEnd { len: u32 },
}

impl TryFrom<RawBitfield> for Bitfield {
    type Error = InvalidBitfield;

    fn try_from(raw: RawBitfield) -> Result<Self, Self::Error> {
        Bitfield::from_parts(raw.len, raw.bits)
    }
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.count(), self.len)
    }
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Bitfield {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
        }
    }

    /// The full set over `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut b = Bitfield {
            len,
            bits: vec![0xff; (len as usize).div_ceil(8)],
        };
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 8;
        if rem != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= 0xffu8 << (8 - rem);
            }
        }
    }

    /// A bitfield over `len` chunks from its bytes (bit `i` is `0x80 >> i % 8` of byte
    /// `i / 8`), if they are exactly `ceil(len / 8)` bytes with no bit set past `len`.
    pub fn from_parts(len: u32, bits: Vec<u8>) -> Result<Self, InvalidBitfield> {
        let expected = (len as usize).div_ceil(8);
        if bits.len() != expected {
            return Err(InvalidBitfield::WrongSize {
                len,
                bytes: bits.len(),
                expected,
            });
        }
        let b = Bitfield { len, bits };
        let rem = len % 8;
        if rem != 0 && b.bits.last().is_some_and(|&last| last & (0xff >> rem) != 0) {
            return Err(InvalidBitfield::BitsPastEnd { len });
        }
        Ok(b)
    }

    /// Returns it if it ranges over exactly `chunks` chunks (the file's count).
    pub fn checked(self, chunks: u32) -> Option<Self> {
        (self.len == chunks).then_some(self)
    }

    /// Number of chunks the set ranges over.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Does it range over no chunks at all?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is chunk `i` in the set? (False when out of range.)
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Adds chunk `i`; returns whether it was newly added. Out of range does nothing.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let byte = &mut self.bits[(i / 8) as usize];
        let mask = 0x80 >> (i % 8);
        let new = *byte & mask == 0;
        *byte |= mask;
        new
    }

    /// Removes chunk `i`.
    pub fn unset(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(0x80 >> (i % 8));
        }
    }

    /// How many chunks are in the set.
    pub fn count(&self) -> u32 {
        let words = self.bits.chunks_exact(8);
        let tail: u32 = words.remainder().iter().map(|b| b.count_ones()).sum();
        words
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()).count_ones())
            .sum::<u32>()
            + tail
    }

    /// Are all chunks in the set? (Stops at the first missing one: the tracker asks this of
    /// every holder of a file it is asked about.)
    pub fn is_full(&self) -> bool {
        let whole = (self.len / 8) as usize;
        let rem = self.len % 8;
        self.bits.get(..whole).is_some_and(|full| {
            let words = full.chunks_exact(8);
            words.remainder().iter().all(|&b| b == 0xff)
                && words
                    .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
                    .all(|w| w == u64::MAX)
        }) && (rem == 0 || self.bits.get(whole) == Some(&(0xffu8 << (8 - rem))))
    }

    /// The indices in this set and not in `earlier`, in order, a byte at a time (a push of
    /// what a peer gained costs little even for a file of many chunks). Indices of `earlier`
    /// past this set's end are ignored.
    pub fn added_since(&self, earlier: &Bitfield) -> Vec<u32> {
        let mut added = Vec::new();
        for (k, &byte) in self.bits.iter().enumerate() {
            let new = byte & !earlier.bits.get(k).copied().unwrap_or(0);
            if new == 0 {
                continue;
            }
            for bit in 0..8u32 {
                if new & (0x80 >> bit) != 0 {
                    added.push(k as u32 * 8 + bit);
                }
            }
        }
        added
    }

    /// The indices in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(move |&i| self.get(i))
    }
}

/// Longest run of consecutive chunks listed one by one.
pub const SPELLED_RUN: u64 = 10;

/// Formats 0-based chunk indices as the 1-based list users see. Short runs are spelled out as
/// the prototype did (`[1, 2, 3, 4, 5, 6, 7]`); runs longer than [`SPELLED_RUN`] are
/// compressed: `[1-700, 702]`. Indices must be sorted ascending.
pub fn format_ranges(indices: impl IntoIterator<Item = u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    let flush = |parts: &mut Vec<String>, (a, b): (u32, u32)| {
        let (a, b) = (u64::from(a) + 1, u64::from(b) + 1);
        if b - a < SPELLED_RUN {
            parts.extend((a..=b).map(|i| i.to_string()));
        } else {
            parts.push(format!("{a}-{b}"));
        }
    };
    for i in indices {
        run = match run {
            Some((a, b)) if b.checked_add(1) == Some(i) => Some((a, i)),
            Some(r) => {
                flush(&mut parts, r);
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some(r) = run {
        flush(&mut parts, r);
    }
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_since_lists_exactly_the_new_indices() {
        for len in [0u32, 1, 7, 8, 9, 100, 1000] {
            let mut earlier = Bitfield::new(len);
            let mut now = Bitfield::new(len);
            let mut expected = Vec::new();
            for i in 0..len {
                match (i.wrapping_mul(2_654_435_761) >> 7) % 3 {
                    0 => {
                        earlier.set(i);
                        now.set(i);
                    }
                    1 => {
                        now.set(i);
                        expected.push(i);
                    }
                    _ => {}
                }
            }
            assert_eq!(now.added_since(&earlier), expected, "len {len}");
            assert!(earlier.added_since(&now).is_empty(), "len {len}");
        }
    }

    #[test]
    fn count_and_is_full_agree_with_the_bits() {
        for len in 0..80u32 {
            let mut b = Bitfield::full(len);
            assert_eq!(b.count(), len);
            assert!(b.is_full(), "{len}");
            for missing in 0..len {
                b.unset(missing);
                assert_eq!(b.count(), len - 1);
                assert!(!b.is_full(), "{len} without {missing}");
                b.set(missing);
            }
            assert_eq!(Bitfield::new(len).is_full(), len == 0);
        }
    }

    #[test]
    fn set_get_count() {
        let mut b = Bitfield::new(10);
        assert_eq!(b.count(), 0);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(9));
        assert!(!b.set(10));
        assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(10));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 9]);
        b.unset(0);
        assert_eq!(b.count(), 1);
        assert!(Bitfield::full(10).is_full());
        assert_eq!(Bitfield::full(10).count(), 10);
        assert!(Bitfield::full(0).is_full());
    }

    #[test]
    fn checked_rejects_other_lengths() {
        assert!(Bitfield::full(10).checked(10).is_some());
        assert!(Bitfield::full(10).checked(11).is_none());
    }

    /// CBOR of a bitfield with any `len` and bytes, as a hostile sender would write it.
    fn raw_cbor(len: u32, bits: &[u8]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Raw<'a> {
            len: u32,
            #[serde(with = "serde_bytes")]
            bits: &'a [u8],
        }
        let mut out = Vec::new();
        ciborium::into_writer(&Raw { len, bits }, &mut out).unwrap();
        out
    }

    fn decode(bytes: &[u8]) -> Result<Bitfield, String> {
        ciborium::from_reader::<Bitfield, _>(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn malformed_bitfields_do_not_decode() {
        // More chunks than bytes: `get` would index past the end.
        let e = decode(&raw_cbor(1_000_000, &[0xff])).unwrap_err();
        assert!(e.contains("carries 1 bytes instead of 125000"), "{e}");
        // Too many bytes, bits past the end, and every valid shape.
        assert!(decode(&raw_cbor(10, &[0xff, 0xc0, 0])).is_err());
        let e = decode(&raw_cbor(10, &[0xff, 0xff])).unwrap_err();
        assert!(e.contains("bits set past its end"), "{e}");
        assert!(decode(&raw_cbor(u32::MAX, &[])).is_err());
        assert_eq!(decode(&raw_cbor(10, &[0xff, 0xc0])), Ok(Bitfield::full(10)));
        assert_eq!(decode(&raw_cbor(0, &[])), Ok(Bitfield::new(0)));
        for len in 0..40 {
            let mut b = Bitfield::new(len);
            (0..len).step_by(3).for_each(|i| {
                b.set(i);
            });
            let mut out = Vec::new();
            ciborium::into_writer(&b, &mut out).unwrap();
            assert_eq!(decode(&out), Ok(b));
        }
    }

    #[test]
    fn a_holder_with_a_malformed_bitfield_fails_the_whole_answer() {
        use crate::{FileSummary, Holder, PeerId, TrackerResponse};
        let summary = FileSummary {
            collection: false,
            id: crate::FileId([1; 32]),
            name: "x".into(),
            size: 10,
            chunk_size: 1,
            chunks: 10,
            seeders: 0,
            holders: 1,
        };
        let good = TrackerResponse::Holders {
            file: summary,
            holders: vec![Holder {
                peer_id: PeerId([2; 16]),
                addr: "127.0.0.1:1".parse().unwrap(),
                chunks: Bitfield::full(10),
                complete: true,
            }],
        };
        let mut frame = Vec::new();
        crate::frame::encode_frame(&good, &mut frame).unwrap();
        // Swap the well-formed bitfield's length (10) for a large one of the same width:
        // `len: 10` is `63 6c 65 6e 0a`; `len: 23` (0x17) still fits the one-byte form.
        let at = frame
            .windows(5)
            .position(|w| w == [0x63, b'l', b'e', b'n', 10])
            .unwrap();
        frame[at + 4] = 0x17;
        let e = crate::frame::decode_frame::<TrackerResponse>(&frame, crate::MAX_FRAME)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bitfield of 23 chunks carries 2 bytes"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a sender writes, a decoded bitfield answers every question without a
        /// panic, and its answers agree with each other.
        #[test]
        fn any_decoded_bitfield_is_safe_to_use(
            len in proptest::prop_oneof![0u32..200, proptest::num::u32::ANY],
            bits in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            if let Ok(b) = decode(&raw_cbor(len, &bits)) {
                proptest::prop_assert_eq!(b.bits.len(), (b.len() as usize).div_ceil(8));
                proptest::prop_assert_eq!(b.iter().count() as u32, b.count());
                proptest::prop_assert_eq!(b.is_full(), b.count() == b.len());
                for i in [0, b.len().saturating_sub(1), b.len(), u32::MAX] {
                    let _ = b.get(i);
                }
            }
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(format_ranges([]), "[]");
        assert_eq!(format_ranges([0]), "[1]");
        assert_eq!(format_ranges([0, 1]), "[1, 2]");
        assert_eq!(
            format_ranges((0..10).collect::<Vec<_>>()),
            "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
        );
        assert_eq!(format_ranges((0..11).collect::<Vec<_>>()), "[1-11]");
        let mut v: Vec<u32> = (0..700).collect();
        v.push(701);
        assert_eq!(format_ranges(v), "[1-700, 702]");
        assert_eq!(format_ranges([0, 2, 3, 4, 9]), "[1, 3, 4, 5, 10]");
        let mut w: Vec<u32> = (0..3).collect();
        w.extend(100..200);
        assert_eq!(format_ranges(w), "[1, 2, 3, 101-200]");
    }
}
