//! [`Picker`]: which chunk a worker asks its peer for next.

use super::*;

/// Which chunks are done, in flight and how rare: shared by a download's workers.
pub(super) struct Picker {
    /// Verified and written (maybe not yet durable).
    pub(super) done: Bitfield,
    pub(super) in_flight: Vec<u8>,
    /// How many connected peers hold each chunk.
    pub(super) availability: Vec<u16>,
    pub(super) remaining: u32,
}

impl Picker {
    pub(super) fn new(have: Bitfield) -> Picker {
        let n = have.len() as usize;
        Picker {
            remaining: have.len() - have.count(),
            done: have,
            in_flight: vec![0; n],
            availability: vec![0; n],
        }
    }

    /// The next chunk to ask a peer holding `has` for: the rarest free chunk (random
    /// tie-break), or in the end game a chunk in flight elsewhere that the asker has not
    /// asked for nor received (`mine`: asked, or received and still being verified).
    ///
    /// The end game starts when every chunk still missing that a connected peer holds has
    /// been asked for: only then can a second request save time (the first may be slow; a
    /// chunk nobody here holds is waited for anyway). Before that, a peer
    /// whose chunks are all in flight elsewhere is asked for nothing: in a crowd, where each
    /// peer holds a few chunks at a time and most are being fetched already, second requests
    /// made then were more than a quarter of what peers sent one another. Workers left
    /// waiting so are not woken when the end game begins: tried, their second copies at the
    /// tail made the crowds slower (40 capped leechers 1.14x alone against 1.12x, the fleet
    /// crowd 1.59x against 1.50x).
    pub(super) fn pick(&mut self, has: &Bitfield, mine: impl Fn(u32) -> bool) -> Option<u32> {
        let n = self.done.len();
        if n == 0 || self.remaining == 0 {
            return None;
        }
        let start = fastrand::u32(..n);
        let mut best: Option<(u16, u32)> = None;
        // Chunks neither done nor asked for that a connected peer holds (counted in full
        // only if the scan ends).
        let mut free = 0u32;
        for k in 0..n {
            let i = (start + k) % n;
            if self.done.get(i) || self.in_flight[i as usize] > 0 {
                continue;
            }
            let a = self.availability[i as usize];
            if a > 0 {
                free += 1;
            }
            if !has.get(i) {
                continue;
            }
            if best.is_none_or(|(b, _)| a < b) {
                best = Some((a, i));
                if a <= 1 {
                    break;
                }
            }
        }
        let end_game = free == 0;
        let chosen = best.map(|(_, i)| i).or_else(|| {
            end_game.then(|| {
                (0..n).map(|k| (start + k) % n).find(|&i| {
                    !self.done.get(i) && has.get(i) && self.in_flight[i as usize] < 2 && !mine(i)
                })
            })?
        })?;
        self.in_flight[chosen as usize] += 1;
        Some(chosen)
    }

    /// A request for chunk `i` ended without it.
    pub(super) fn release(&mut self, i: u32) {
        if let Some(c) = self.in_flight.get_mut(i as usize) {
            *c = c.saturating_sub(1);
        }
    }

    /// Chunk `i` arrived verified. Returns whether it was new.
    pub(super) fn finish(&mut self, i: u32) -> bool {
        self.release(i);
        let new = self.done.set(i);
        if new {
            self.remaining -= 1;
        }
        new
    }

    pub(super) fn add_availability_of(&mut self, i: u32, delta: i32) {
        if let Some(a) = self.availability.get_mut(i as usize) {
            *a = (i32::from(*a) + delta).clamp(0, i32::from(u16::MAX)) as u16;
        }
    }

    pub(super) fn add_availability(&mut self, has: &Bitfield, delta: i32) {
        for i in has.iter() {
            self.add_availability_of(i, delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picker_prefers_rare_chunks_and_enters_end_game() {
        let mut p = Picker::new(Bitfield::new(4));
        let mut first_two = Bitfield::new(4);
        first_two.set(0);
        first_two.set(1);
        let mut only1 = Bitfield::new(4);
        only1.set(1);
        // Two peers: one holds 0 and 1, the other only 1; so 0 is the rarer.
        p.add_availability(&first_two, 1);
        p.add_availability(&only1, 1);
        let rare = first_two;
        // Peer holds 0 and 1; 0 has availability 1, 1 has 2: 0 first.
        assert_eq!(p.pick(&rare, |_| false), Some(0));
        assert_eq!(p.pick(&rare, |_| false), Some(1));
        // Chunks 2 and 3 are missing, a third peer holds them, and nobody was asked for them
        // yet: no end game.
        let mut last_two = Bitfield::new(4);
        last_two.set(2);
        last_two.set(3);
        p.add_availability(&last_two, 1);
        assert_eq!(p.pick(&rare, |_| false), None);
        assert!(p.pick(&last_two, |_| false).is_some());
        assert!(p.pick(&last_two, |_| false).is_some());
        // Every missing chunk in flight: the end game hands out a second copy, but not to
        // the same asker.
        let asked: VecDeque<u32> = [0, 1].into();
        assert_eq!(p.pick(&rare, |i| asked.contains(&i)), None);
        let second = p.pick(&rare, |_| false).unwrap();
        assert!(second == 0 || second == 1);
        assert!(p.finish(0));
        assert!(!p.finish(0), "a duplicate is not new");
        assert_eq!(p.remaining, 3);
    }

    /// In a crowd each peer holds a few chunks, mostly being fetched from others already.
    /// Asking it for second copies then wasted more than a quarter of what leechers sent one
    /// another (bench `--only crowd`); such a peer is asked for nothing until the end game.
    #[test]
    fn a_peer_whose_chunks_are_all_asked_for_elsewhere_gets_no_request_before_the_end_game() {
        let mut p = Picker::new(Bitfield::new(64));
        let mut few = Bitfield::new(64);
        for i in 0..4 {
            few.set(i);
        }
        let all = Bitfield::full(64);
        p.add_availability(&all, 1);
        p.add_availability(&few, 1);
        // The seeder's worker has asked for the few chunks the other peer holds.
        for i in 0..4 {
            p.in_flight[i] = 1;
        }
        assert_eq!(
            p.pick(&few, |_| false),
            None,
            "60 chunks were never asked for"
        );
        // Once every missing chunk is in flight, the other peer may race the first asker.
        while p.pick(&all, |i| i < 4).is_some() {}
        assert!(p.pick(&few, |_| false).is_some_and(|i| i < 4));
    }

    #[test]
    fn picker_never_hands_out_done_or_unheld_chunks() {
        let mut have = Bitfield::new(8);
        have.set(3);
        let mut p = Picker::new(have);
        let mut peer = Bitfield::new(8);
        peer.set(3);
        peer.set(5);
        p.add_availability(&peer, 1);
        assert_eq!(p.pick(&peer, |_| false), Some(5));
        p.finish(5);
        assert_eq!(p.pick(&peer, |_| false), None);
        assert_eq!(p.remaining, 6);
    }
}
