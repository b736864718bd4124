//! What each file's holders hold, kept so that a few can be picked at random without a pass
//! over all of them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use p2p_schema::{Bitfield, Manifest, PeerId};

/// What a peer holds of a file.
pub(super) enum Holding {
    /// Every chunk: most holdings once a crowd is done, kept without a bitfield.
    All,
    /// Some chunks (never all: a bitfield that fills up becomes [`Holding::All`]).
    Some(Box<Bitfield>),
}

impl Holding {
    pub(super) fn of(bits: Bitfield) -> Holding {
        if bits.is_full() {
            Holding::All
        } else {
            Holding::Some(Box::new(bits))
        }
    }

    pub(super) fn is_all(&self) -> bool {
        matches!(self, Holding::All)
    }
}

pub(super) struct FileEntry {
    pub(super) manifest: Arc<Manifest>,
    /// The holders, in no order: a few are picked at random without a pass over all.
    pub(super) holders: Vec<(PeerId, Holding)>,
    /// Where each holder is in `holders`.
    slot: HashMap<PeerId, u32>,
    /// How many holders hold everything.
    pub(super) seeders: u32,
    /// Registered only as a collection's file: found by ID, not listed.
    pub(super) member: bool,
}

impl FileEntry {
    pub(super) fn new(manifest: Arc<Manifest>) -> FileEntry {
        FileEntry {
            manifest,
            holders: Vec::new(),
            slot: HashMap::new(),
            seeders: 0,
            member: false,
        }
    }

    pub(super) fn holding_mut(&mut self, peer: &PeerId) -> Option<&mut Holding> {
        let i = *self.slot.get(peer)? as usize;
        self.holders.get_mut(i).map(|(_, h)| h)
    }

    /// Sets what `peer` holds; returns whether it is a new holder.
    pub(super) fn set(&mut self, peer: PeerId, holding: Holding) -> bool {
        self.seeders += u32::from(holding.is_all());
        match self.holding_mut(&peer) {
            Some(h) => {
                let was_all = h.is_all();
                *h = holding;
                self.seeders -= u32::from(was_all);
                false
            }
            None => {
                self.slot.insert(peer, self.holders.len() as u32);
                self.holders.push((peer, holding));
                true
            }
        }
    }

    /// `peer` holds nothing of the file any more. Returns whether it held some.
    pub(super) fn remove(&mut self, peer: &PeerId) -> bool {
        let Some(i) = self.slot.remove(peer) else {
            return false;
        };
        let (_, h) = self.holders.swap_remove(i as usize);
        self.seeders -= u32::from(h.is_all());
        if let Some((moved, _)) = self.holders.get(i as usize) {
            self.slot.insert(*moved, i);
        }
        true
    }
}

/// `k` distinct indices below `len` (all of them if there are no more), in random order, in
/// time and memory proportional to `k`.
pub(super) fn sample(len: usize, k: usize) -> Vec<usize> {
    if len <= k.saturating_mul(4) {
        let mut all: Vec<usize> = (0..len).collect();
        let k = k.min(len);
        for i in 0..k {
            all.swap(i, fastrand::usize(i..len));
        }
        all.truncate(k);
        return all;
    }
    // Here fewer than a quarter are wanted: each draw is new with odds of 3 in 4 or better.
    let (mut picked, mut seen) = (Vec::with_capacity(k), HashSet::with_capacity(k));
    while picked.len() < k {
        let i = fastrand::usize(..len);
        if seen.insert(i) {
            picked.push(i);
        }
    }
    picked
}
