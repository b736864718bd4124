//! [`LocalFile`]: a file this daemon can serve chunks of, whole (a share) or in part (a
//! download in progress). The peer server reads chunks through it; downloads add to it.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2p_schema::{Bitfield, FileId, Manifest, PeerId};

use crate::lock;

/// A file with chunks to serve.
pub struct LocalFile {
    pub id: FileId,
    pub manifest: Arc<Manifest>,
    /// An open handle on the data (the share itself, or the partial file; a rename on
    /// completion does not disturb it).
    file: Arc<File>,
    inner: Mutex<Inner>,
    /// Bytes served to other peers.
    pub uploaded: AtomicU64,
    /// What was sent to whom (see [`LocalFile::may_send`]).
    sent: Mutex<Sends>,
}

struct Inner {
    /// Chunks verified and durable: the only ones served or announced.
    have: Bitfield,
    path: PathBuf,
    /// Set when the data can no longer be trusted (source changed): nothing is served.
    problem: Option<String>,
    /// For a whole file: its size and modification time as hashed. Checked before serving,
    /// so a file changed behind our back is never served stale.
    source: Option<(u64, i128)>,
}

/// Chunk sends, for [`LocalFile::may_send`].
struct Sends {
    /// The last send of each chunk sent lately: when it was delivered, and to whom.
    last: HashMap<u32, (Instant, PeerId)>,
    /// Chunks sent at least once since peers began fetching from an idle server (`epoch`).
    ever: Bitfield,
    epoch: u64,
}

/// Most entries kept in [`Sends::last`] (old ones go first).
const MAX_SENDS: usize = 65_536;

impl LocalFile {
    /// A file over `file`, holding the chunks in `have`.
    pub fn new(manifest: Arc<Manifest>, file: File, path: PathBuf, have: Bitfield) -> LocalFile {
        let chunks = manifest.chunk_count();
        LocalFile {
            id: manifest.file_id(),
            manifest,
            file: Arc::new(file),
            inner: Mutex::new(Inner {
                have,
                path,
                problem: None,
                source: None,
            }),
            uploaded: AtomicU64::new(0),
            sent: Mutex::new(Sends {
                last: HashMap::new(),
                ever: Bitfield::new(chunks),
                epoch: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The handle to read from (or write to, for a download).
    pub fn handle(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Can chunk `index` be served?
    pub fn has(&self, index: u32) -> bool {
        let inner = self.lock();
        inner.problem.is_none() && inner.have.get(index)
    }

    /// The chunks that can be served.
    pub fn have(&self) -> Bitfield {
        let inner = self.lock();
        if inner.problem.is_some() {
            return Bitfield::new(self.manifest.chunk_count());
        }
        inner.have.clone()
    }

    /// How many chunks are held.
    pub fn have_count(&self) -> u32 {
        self.lock().have.count()
    }

    /// Is every chunk held?
    pub fn is_complete(&self) -> bool {
        self.lock().have.is_full()
    }

    /// Adds chunks that are now verified and durable.
    pub fn add(&self, indices: &[u32]) {
        let mut inner = self.lock();
        for &i in indices {
            inner.have.set(i);
        }
    }

    /// Where the data lies now.
    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// The data moved (a finished download renamed into place).
    pub fn set_path(&self, path: PathBuf) {
        self.lock().path = path;
    }

    /// Records the size and modification time the whole file must keep to be served.
    pub fn set_source(&self, size: u64, mtime_ns: i128) {
        self.lock().source = Some((size, mtime_ns));
    }

    /// Checks (blocking: a `stat`) that a whole file is unchanged since it was hashed. If it
    /// changed or vanished, it stops being served and the reason is returned.
    pub fn check_source(&self) -> Result<(), String> {
        let (path, source) = {
            let inner = self.lock();
            if let Some(p) = &inner.problem {
                return Err(p.clone());
            }
            (inner.path.clone(), inner.source)
        };
        let Some((size, mtime)) = source else {
            return Ok(());
        };
        let why = match std::fs::metadata(&path) {
            Ok(m) if m.len() == size && crate::register::mtime_ns(&m) == mtime => return Ok(()),
            Ok(_) => format!(
                "{} changed since it was registered; register it again to share it",
                path.display()
            ),
            Err(e) => format!("{} cannot be read any more: {e}", path.display()),
        };
        tracing::warn!(file = %self.id.short(), "{why}; no longer serving it");
        self.set_problem(why.clone());
        Err(why)
    }

    /// Stops serving, for `why`.
    pub fn set_problem(&self, why: String) {
        self.lock().problem = Some(why);
    }

    /// Why it is not served, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.lock().problem.clone()
    }

    /// Whether chunk `index` may go to peer `to` now: not if it is going, or went less than
    /// `spread` ago (see [`LocalFile::sent`]), to another peer that is still fetching from us
    /// (`fetching`), so still downloading. That peer will soon serve it too; meanwhile our
    /// uplink is better spent on chunks nobody else has (a download asks for another chunk
    /// and comes back later). A peer holding the whole file also holds a chunk back, whatever
    /// the spread, until every chunk has gone out once: its first pass over the file is all
    /// new data for the swarm (a pass starts when peers begin fetching from an idle server:
    /// `epoch` changes then). Records the send when allowed.
    pub fn may_send(
        &self,
        index: u32,
        to: PeerId,
        spread: Duration,
        epoch: u64,
        fetching: impl Fn(&PeerId) -> bool,
    ) -> bool {
        let now = Instant::now();
        let whole = self.is_complete();
        let mut sends = lock(&self.sent);
        if sends.epoch != epoch {
            sends.epoch = epoch;
            sends.ever = Bitfield::new(self.manifest.chunk_count());
        }
        let first_pass = whole && !sends.ever.is_full();
        if let Some(&(at, last)) = sends.last.get(&index) {
            let recent = first_pass || now.duration_since(at) < spread;
            if last != to && recent && fetching(&last) {
                return false;
            }
        }
        if sends.last.len() >= MAX_SENDS {
            sends
                .last
                .retain(|_, (at, _)| now.duration_since(*at) < spread);
        }
        sends.last.insert(index, (now, to));
        sends.ever.set(index);
        true
    }

    /// Chunk `index` has reached peer `to`: the spread starts now.
    pub fn sent(&self, index: u32, to: PeerId) {
        let mut sends = lock(&self.sent);
        if let Some(entry) = sends.last.get_mut(&index).filter(|(_, last)| *last == to) {
            entry.0 = Instant::now();
        }
    }

    /// Counts bytes served.
    pub fn add_uploaded(&self, n: u64) {
        self.uploaded.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalFile {
        let manifest = Manifest {
            name: "x.bin".into(),
            size: 4096,
            chunk_size: 1024,
            hashes: vec![0; 4 * 32],
        };
        let file = tempfile::tempfile().expect("temp file");
        LocalFile::new(Arc::new(manifest), file, "x.bin".into(), Bitfield::full(4))
    }

    #[test]
    fn a_whole_file_goes_out_once_before_any_chunk_goes_out_twice() {
        let f = local();
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = Duration::from_millis(1);
        let all = |_: &PeerId| true;
        for i in 0..3 {
            assert!(f.may_send(i, a, spread, 0, all));
        }
        std::thread::sleep(Duration::from_millis(5));
        // Past the spread, but chunk 3 has not gone out yet: the others wait.
        assert!(!f.may_send(0, b, spread, 0, all));
        assert!(
            f.may_send(0, b, spread, 0, |p| *p != a),
            "unless their recipient is gone"
        );
        assert!(f.may_send(3, b, spread, 0, all));
        std::thread::sleep(Duration::from_millis(5));
        assert!(f.may_send(1, b, spread, 0, all));
        // Peers begin fetching anew from an idle server: a new first pass, in which chunk 1
        // (last sent to b) waits for every other chunk, past its spread.
        std::thread::sleep(Duration::from_millis(5));
        assert!(!f.may_send(1, a, spread, 1, all));
        assert!(f.may_send(1, b, spread, 1, all));
    }

    #[test]
    fn a_chunk_just_sent_goes_to_nobody_else_until_the_spread_has_passed() {
        let f = local();
        // Every chunk out once (to a peer since gone): only the spread applies from here.
        let c = PeerId::random();
        for i in 0..4 {
            assert!(f.may_send(i, c, Duration::ZERO, 0, |_| false));
        }
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = Duration::from_millis(200);
        let all = |p: &PeerId| *p != c;
        assert!(f.may_send(1, a, spread, 0, all));
        // The same peer may have it again (it asked twice, or lost it); another not yet.
        assert!(f.may_send(1, a, spread, 0, all));
        assert!(!f.may_send(1, b, spread, 0, all));
        // Unless the first is gone (finished, or died): then nobody else would pass it on.
        assert!(f.may_send(1, b, spread, 0, |p| *p != a));
        assert!(!f.may_send(1, a, spread, 0, all));
        // Other chunks are not affected.
        assert!(f.may_send(2, a, spread, 0, all));
        std::thread::sleep(spread + Duration::from_millis(20));
        assert!(f.may_send(1, a, spread, 0, all));
    }
}
