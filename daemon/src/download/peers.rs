//! What a download remembers of the peers it fetched from.

use super::*;

/// What became of a peer when its session ended.
pub(super) enum Verdict {
    /// Try it again after this wait.
    Retry(Duration),
    /// Left out for [`SET_ASIDE`]: it faulted [`MAX_FAULTS`] sessions in a row.
    SetAside,
    /// Left out for the rest of the download: it sent bad data.
    Banned,
}

/// What a download remembers of the peers it fetched from: bad-data strikes, faults in a
/// row, and until when each is left out. Bounded: expired entries are pruned as it goes, and
/// past [`MAX_PEER_RECORDS`] the oldest waits are forgotten.
#[derive(Default)]
pub(super) struct PeerRecords {
    strikes: HashMap<PeerId, u32>,
    /// Sessions in a row that ended badly without a chunk, and faults among them.
    failures: HashMap<PeerId, (u32, u32)>,
    /// Left out until then (`None`: for good).
    out_until: HashMap<PeerId, Option<Instant>>,
}

impl PeerRecords {
    /// May a session with `peer` start now?
    pub(super) fn may_try(&mut self, peer: &PeerId) -> bool {
        match self.out_until.get(peer) {
            None => true,
            Some(None) => false,
            Some(Some(t)) if Instant::now() < *t => false,
            Some(Some(_)) => {
                self.out_until.remove(peer);
                true
            }
        }
    }

    /// Counts a chunk from `peer` that failed verification; returns its strikes.
    pub(super) fn strike(&mut self, peer: PeerId) -> u32 {
        let n = self.strikes.entry(peer).or_insert(0);
        *n += 1;
        *n
    }

    /// A session with `peer` ended, having delivered `delivered` chunks, with `error` if it
    /// ended badly: decides when to try it again.
    pub(super) fn session_ended(
        &mut self,
        peer: PeerId,
        delivered: u32,
        error: Option<&WorkerError>,
    ) -> Verdict {
        if delivered > 0 {
            self.failures.remove(&peer);
        }
        let Some(error) = error else {
            return Verdict::Retry(Duration::ZERO);
        };
        let verdict = match error {
            WorkerError::BadData(_) => {
                self.out_until.insert(peer, None);
                Verdict::Banned
            }
            // Not the peer's doing: no fault, a short wait.
            WorkerError::Write(_) | WorkerError::Internal(_) => {
                self.out_until
                    .insert(peer, Some(Instant::now() + RETRY_WAIT));
                Verdict::Retry(RETRY_WAIT)
            }
            WorkerError::Unreachable(_) | WorkerError::Misbehaved(_) => {
                let (failed, faults) = self.failures.entry(peer).or_insert((0, 0));
                *failed += 1;
                if matches!(error, WorkerError::Misbehaved(_)) {
                    *faults += 1;
                }
                if *faults >= MAX_FAULTS {
                    self.failures.remove(&peer);
                    self.out_until
                        .insert(peer, Some(Instant::now() + SET_ASIDE));
                    Verdict::SetAside
                } else {
                    let wait = RETRY_WAIT
                        .saturating_mul(1 << (*failed - 1).min(8))
                        .min(MAX_RETRY_WAIT);
                    self.out_until.insert(peer, Some(Instant::now() + wait));
                    Verdict::Retry(wait)
                }
            }
        };
        self.prune();
        verdict
    }

    /// Forgets waits that are over; past the bound, the waits ending soonest too, and then
    /// failure counts and strikes of peers no longer remembered (bans for bad data are kept).
    fn prune(&mut self) {
        let now = Instant::now();
        self.out_until.retain(|_, t| t.is_none_or(|t| now < t));
        if self.out_until.len() > MAX_PEER_RECORDS {
            let mut waits: Vec<_> = self
                .out_until
                .iter()
                .filter_map(|(p, t)| t.map(|t| (t, *p)))
                .collect();
            waits.sort();
            // Down to three quarters of the bound, so the sort is not paid at every session.
            let excess = self.out_until.len() - MAX_PEER_RECORDS * 3 / 4;
            for (_, p) in waits.into_iter().take(excess) {
                self.out_until.remove(&p);
            }
        }
        if self.failures.len() > MAX_PEER_RECORDS {
            self.failures.clear();
        }
        if self.strikes.len() > MAX_PEER_RECORDS {
            self.strikes.retain(|p, _| self.out_until.contains_key(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misbehaved() -> WorkerError {
        WorkerError::Misbehaved("wrong length".into())
    }

    #[test]
    fn a_faulting_peer_waits_longer_each_time_then_is_set_aside() {
        let mut records = PeerRecords::default();
        let peer = PeerId::random();
        assert!(matches!(
            records.session_ended(peer, 0, Some(&misbehaved())),
            Verdict::Retry(w) if w == RETRY_WAIT
        ));
        assert!(
            !records.may_try(&peer),
            "tried again before its wait is over"
        );
        assert!(matches!(
            records.session_ended(peer, 0, Some(&misbehaved())),
            Verdict::Retry(w) if w == RETRY_WAIT * 2
        ));
        assert!(matches!(
            records.session_ended(peer, 0, Some(&misbehaved())),
            Verdict::SetAside
        ));
        assert!(!records.may_try(&peer));
        // A peer that cannot be reached is retried with growing waits, never set aside.
        let gone = PeerId::random();
        let unreachable = WorkerError::Unreachable("connection refused".into());
        for _ in 0..10 {
            let verdict = records.session_ended(gone, 0, Some(&unreachable));
            assert!(matches!(verdict, Verdict::Retry(w) if w <= MAX_RETRY_WAIT));
        }
        // A chunk delivered clears the count: faults must come in a row.
        let flaky = PeerId::random();
        records.session_ended(flaky, 0, Some(&misbehaved()));
        records.session_ended(flaky, 0, Some(&misbehaved()));
        assert!(matches!(
            records.session_ended(flaky, 5, Some(&misbehaved())),
            Verdict::Retry(w) if w == RETRY_WAIT
        ));
        // Bad data bans for good.
        let liar = PeerId::random();
        assert!(matches!(
            records.session_ended(liar, 0, Some(&WorkerError::BadData(2))),
            Verdict::Banned
        ));
        assert!(!records.may_try(&liar));
    }

    #[test]
    fn what_a_download_remembers_of_peers_stays_bounded() {
        let mut records = PeerRecords::default();
        let unreachable = WorkerError::Unreachable("connection refused".into());
        for _ in 0..(MAX_PEER_RECORDS * 2) {
            let peer = PeerId::random();
            records.strike(peer);
            records.session_ended(peer, 0, Some(&unreachable));
        }
        assert!(
            records.out_until.len() <= MAX_PEER_RECORDS,
            "{}",
            records.out_until.len()
        );
        assert!(
            records.failures.len() <= MAX_PEER_RECORDS,
            "{}",
            records.failures.len()
        );
        assert!(
            records.strikes.len() <= MAX_PEER_RECORDS + 1,
            "{}",
            records.strikes.len()
        );
        // A wait that is over is forgotten when the peer is tried again.
        let peer = PeerId::random();
        records.out_until.insert(peer, Some(Instant::now()));
        assert!(records.may_try(&peer));
        assert!(!records.out_until.contains_key(&peer));
    }
}
