//! [`Bitfield`]: which chunks of a file a peer holds, and [`format_ranges`] for showing it.

use serde::{Deserialize, Serialize};

/// A set of chunk indices `0..len`, one bit each (most significant bit first in each byte).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
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

    /// Checks a bitfield decoded from the wire: the right number of bytes for `len`, and no
    /// bits set past the end. Returns it if it fits a file of `chunks` chunks.
    pub fn checked(self, chunks: u32) -> Option<Self> {
        if self.len != chunks || self.bits.len() != (self.len as usize).div_ceil(8) {
            return None;
        }
        let mut copy = self.clone();
        copy.clear_tail();
        (copy == self).then_some(self)
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
    fn checked_rejects_bad_shapes() {
        assert!(Bitfield::full(10).checked(10).is_some());
        assert!(Bitfield::full(10).checked(11).is_none());
        let bad = Bitfield {
            len: 10,
            bits: vec![0xff, 0xff],
        };
        assert!(bad.checked(10).is_none());
        let short = Bitfield {
            len: 10,
            bits: vec![0xff],
        };
        assert!(short.checked(10).is_none());
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
