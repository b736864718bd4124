//! [`LocalFile`]: a file this daemon can serve chunks of, whole (a share) or in part (a
//! download in progress). The peer server reads chunks through it; downloads add to it.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, Metadata};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use p2p_schema::{Bitfield, FileId, Manifest, PeerId};

use crate::lock;
use crate::spans::Spans;

/// What tells, without reading it, that a whole file still holds the bytes that were hashed:
/// its size, modification time, the file itself (inode and device) and its change time (Unix).
/// A file rewritten in place changes size or modification time; one replaced by another
/// (an editor's or rsync's rename, `cp -p`, `touch -r`) changes inode or change time even
/// where size and modification time are kept. Taken only once no writer of ours can still
/// touch the file (see `daemon/STATE.md`, "Shares and the changed-source check").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub size: u64,
    /// Nanoseconds since the epoch (0 where the platform has none).
    pub mtime_ns: i128,
    /// Inode and device, where the platform has them (and the record was written by a
    /// version that kept them).
    pub file: Option<(u64, u64)>,
    /// Change time in nanoseconds since the epoch, where the platform has one.
    pub ctime_ns: Option<i128>,
}

impl Identity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &Metadata) -> Identity {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        #[cfg(unix)]
        let (file, ctime_ns) = {
            use std::os::unix::fs::MetadataExt;
            let ctime = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
            (Some((meta.ino(), meta.dev())), Some(ctime))
        };
        #[cfg(not(unix))]
        let (file, ctime_ns) = (None, None);
        Identity {
            size: meta.len(),
            mtime_ns,
            file,
            ctime_ns,
        }
    }

    /// What differs between this (recorded) identity and `now`'s, if anything; a part
    /// missing on either side (an older record, another platform) is not compared.
    pub fn change(&self, now: &Identity) -> Option<&'static str> {
        fn differ<T: PartialEq>(a: Option<T>, b: Option<T>) -> bool {
            matches!((a, b), (Some(a), Some(b)) if a != b)
        }
        if self.size != now.size {
            Some("its size changed")
        } else if self.mtime_ns != now.mtime_ns {
            Some("its modification time changed")
        } else if differ(self.file, now.file) {
            Some("another file took its place")
        } else if differ(self.ctime_ns, now.ctime_ns) {
            Some("its change time moved")
        } else {
            None
        }
    }
}

/// A file with chunks to serve.
pub struct LocalFile {
    pub id: FileId,
    pub manifest: Arc<Manifest>,
    /// An open handle on the data (the share itself, or the partial file; a rename on
    /// completion does not disturb it). A whole file's handle is opened on demand and closed
    /// again when others were opened since (see [`MAX_OPEN_SHARES`]): a daemon sharing
    /// thousands of files holds a few descriptors, not thousands.
    file: Slot,
    /// Whether the handle may be closed and opened again (a whole file, nothing writing it).
    evictable: AtomicBool,
    inner: Mutex<Inner>,
    /// Bytes served to other peers.
    pub uploaded: AtomicU64,
    /// What was sent to whom (see [`LocalFile::may_send`]).
    sent: Mutex<Sends>,
    /// Bumped each time chunks are added: peers watching the file are told (see
    /// [`LocalFile::watch`]).
    gained: tokio::sync::watch::Sender<u64>,
    /// For a collection's pack served from the files it packs: where they lie in it (the
    /// pack has no file, nor handle, of its own).
    spans: Option<Arc<Spans>>,
}

struct Inner {
    /// Chunks verified and durable: the only ones served or announced.
    have: Bitfield,
    path: PathBuf,
    /// Set when the data can no longer be trusted (source changed): nothing is served.
    problem: Option<String>,
    /// For a whole file: its identity as hashed (or as completed). Checked before serving, so
    /// a file changed behind our back is never served stale.
    source: Option<Identity>,
    /// The collection this file is part of, when it is held only as a member of one: it is
    /// then announced through the collection, not on its own.
    collection: Option<FileId>,
}

/// Chunk sends, for [`LocalFile::may_send`].
struct Sends {
    /// The last send of each chunk sent lately: when it was delivered, and to whom.
    last: HashMap<u32, (Instant, PeerId)>,
    /// Chunks sent at least once since peers began fetching from an idle server (`epoch`).
    ever: Bitfield,
    epoch: u64,
}

/// How long a seeder holds a chunk back from others (see [`LocalFile::may_send`]).
#[derive(Debug, Clone, Copy)]
pub struct Hold {
    /// After a send, in general.
    pub spread: Duration,
    /// After a send in the first pass over the file (at least `spread`).
    pub first_pass: Duration,
}

/// Most entries kept in [`Sends::last`] (old ones go first).
const MAX_SENDS: usize = 65_536;

/// Most handles of whole files kept open at once; the one opened first is closed when
/// another is opened past this (a read in progress keeps its own reference until it ends).
pub const MAX_OPEN_SHARES: usize = 64;

/// A file's handle, if open.
type Handle = Mutex<Option<Arc<File>>>;
type Slot = Arc<Handle>;

/// Handles of whole files open now, first opened first.
static OPEN_SHARES: Mutex<VecDeque<Weak<Handle>>> = Mutex::new(VecDeque::new());

/// Counts `slot`'s handle among those open, closing the oldest past [`MAX_OPEN_SHARES`].
fn admit(slot: &Slot) {
    let mut open = lock(&OPEN_SHARES);
    open.push_back(Arc::downgrade(slot));
    while open.len() > MAX_OPEN_SHARES {
        if let Some(old) = open.pop_front().and_then(|w| w.upgrade()) {
            lock(&old).take();
        }
    }
}

impl LocalFile {
    /// A file over `file`, holding the chunks in `have`.
    pub fn new(manifest: Arc<Manifest>, file: File, path: PathBuf, have: Bitfield) -> LocalFile {
        let whole = have.is_full();
        let local = LocalFile::new_with(manifest, Some(file), path, have);
        if whole {
            local.make_evictable();
        }
        local
    }

    fn new_with(
        manifest: Arc<Manifest>,
        file: Option<File>,
        path: PathBuf,
        have: Bitfield,
    ) -> LocalFile {
        let chunks = manifest.chunk_count();
        LocalFile {
            id: manifest.file_id(),
            manifest,
            file: Arc::new(Mutex::new(file.map(Arc::new))),
            evictable: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                have,
                path,
                problem: None,
                source: None,
                collection: None,
            }),
            uploaded: AtomicU64::new(0),
            sent: Mutex::new(Sends {
                last: HashMap::new(),
                ever: Bitfield::new(chunks),
                epoch: 0,
            }),
            gained: tokio::sync::watch::Sender::new(0),
            spans: None,
        }
    }

    /// Wakes when chunks are added (see [`LocalFile::add`]); the caller compares
    /// [`LocalFile::have`] with what it last told.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.gained.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// A whole file, not opened until a chunk of it is read.
    pub fn closed(manifest: Arc<Manifest>, path: PathBuf, source: Identity) -> LocalFile {
        let chunks = manifest.chunk_count();
        let local = LocalFile::new_with(manifest, None, path, Bitfield::full(chunks));
        local.set_source(source);
        local.evictable.store(true, Ordering::Relaxed);
        local
    }

    /// A collection's pack, served from the files it packs; `root` is the collection's
    /// directory (what `path` shows).
    pub fn packed(manifest: Arc<Manifest>, root: PathBuf, spans: Arc<Spans>) -> LocalFile {
        let chunks = manifest.chunk_count();
        let mut local = LocalFile::new_with(manifest, None, root, Bitfield::full(chunks));
        local.spans = Some(spans);
        local
    }

    /// Where the files a pack served from them lie in it.
    pub fn spans(&self) -> Option<&Arc<Spans>> {
        self.spans.as_ref()
    }

    /// The handle to read from (or write to, for a download), opened if it was closed: then
    /// checked to be the file recorded (else it is no longer served).
    pub fn handle(&self) -> std::io::Result<Arc<File>> {
        if self.spans.is_some() {
            return Err(std::io::Error::other(
                "a pack is read from the files it packs",
            ));
        }
        if let Some(f) = lock(&self.file).as_ref() {
            return Ok(f.clone());
        }
        let (path, source) = {
            let inner = self.lock();
            if let Some(p) = &inner.problem {
                return Err(std::io::Error::other(p.clone()));
            }
            (inner.path.clone(), inner.source)
        };
        let file = File::open(&path)?;
        if let Some(recorded) = source {
            if let Some(what) = recorded.change(&Identity::of(&file.metadata()?)) {
                let why = format!(
                    "{} changed since it was registered ({what}); register it again to share it",
                    path.display()
                );
                self.set_problem(why.clone());
                return Err(std::io::Error::other(why));
            }
        }
        let file = Arc::new(file);
        *lock(&self.file) = Some(file.clone());
        admit(&self.file);
        Ok(file)
    }

    /// The file is whole and nothing of ours writes it any more: its handle may be closed
    /// when others are opened (and opened again when needed).
    pub fn make_evictable(&self) {
        if !self.evictable.swap(true, Ordering::Relaxed) && lock(&self.file).is_some() {
            admit(&self.file);
        }
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
        drop(inner);
        self.gained.send_modify(|n| *n += 1);
    }

    /// Where the data lies now.
    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// The data moved (a finished download renamed into place).
    pub fn set_path(&self, path: PathBuf) {
        self.lock().path = path;
    }

    /// The collection this file is held for (see [`Inner::collection`]).
    pub fn collection(&self) -> Option<FileId> {
        self.lock().collection
    }

    /// Holds the file for `collection` only (`None`: on its own too).
    pub fn set_collection(&self, collection: Option<FileId>) {
        self.lock().collection = collection;
    }

    /// The identity the whole file must keep to be served, once recorded.
    pub fn source(&self) -> Option<Identity> {
        self.lock().source
    }

    /// Records the identity the whole file must keep to be served.
    pub fn set_source(&self, identity: Identity) {
        self.lock().source = Some(identity);
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
        let Some(recorded) = source else {
            return Ok(());
        };
        let why = match std::fs::metadata(&path).map(|m| recorded.change(&Identity::of(&m))) {
            Ok(None) => return Ok(()),
            Ok(Some(what)) => format!(
                "{} changed since it was registered ({what}); register it again to share it",
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

    /// Serves it again (its data was checked anew by the caller).
    pub fn clear_problem(&self) {
        self.lock().problem = None;
    }

    /// Why it is not served, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.lock().problem.clone()
    }

    /// Whether chunk `index` may go to peer `to` now. Only a peer holding the whole file (a
    /// seeder) holds chunks back: not if it is going, or went less than `hold.spread` ago (see
    /// [`LocalFile::sent`]), to another peer that is still fetching from us (`fetching`), so
    /// still downloading. That peer will soon serve it too; meanwhile the seeder's uplink is
    /// better spent on chunks nobody else has (a download asks for another chunk and comes
    /// back later). Until every chunk has gone out once it holds a chunk
    /// back longer, for `hold.first_pass`: its first pass over the file is all new data for
    /// the swarm (a pass starts when peers begin fetching from an idle server: `epoch` changes
    /// then). That hold is bounded too: a recipient that does not pass a chunk on (no one
    /// happens to fetch from it) must not keep it from the swarm for ever. A peer still
    /// downloading sends whatever it holds to whoever asks: every downloader needs
    /// every chunk, so none of its uplink is spent in vain, and in a crowd it holds few
    /// chunks at a time (holding each back for a while would idle its uplink). Records the
    /// send when allowed.
    pub fn may_send(
        &self,
        index: u32,
        to: PeerId,
        hold: Hold,
        epoch: u64,
        fetching: impl Fn(&PeerId) -> bool,
    ) -> bool {
        self.check_send(index, to, (hold, epoch), fetching, true)
    }

    /// Whether [`LocalFile::may_send`] would refuse chunk `index` to `to` now; records nothing.
    pub fn holds_back(
        &self,
        index: u32,
        to: PeerId,
        hold: Hold,
        epoch: u64,
        fetching: impl Fn(&PeerId) -> bool,
    ) -> bool {
        !self.check_send(index, to, (hold, epoch), fetching, false)
    }

    fn check_send(
        &self,
        index: u32,
        to: PeerId,
        (hold, epoch): (Hold, u64),
        fetching: impl Fn(&PeerId) -> bool,
        record: bool,
    ) -> bool {
        let now = Instant::now();
        let whole = self.is_complete();
        if !whole {
            return true;
        }
        let mut sends = lock(&self.sent);
        if sends.epoch != epoch {
            sends.epoch = epoch;
            sends.ever = Bitfield::new(self.manifest.chunk_count());
        }
        let first_pass = whole && !sends.ever.is_full();
        if let Some(&(at, last)) = sends.last.get(&index) {
            let held = if first_pass {
                hold.first_pass.max(hold.spread)
            } else {
                hold.spread
            };
            let recent = now.duration_since(at) < held;
            if last != to && recent && fetching(&last) {
                return false;
            }
        }
        if !record {
            return true;
        }
        if sends.last.len() >= MAX_SENDS {
            sends
                .last
                .retain(|_, (at, _)| now.duration_since(*at) < hold.spread);
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

    /// A hold of `spread`, and of a minute in a first pass.
    fn hold(spread: Duration) -> Hold {
        Hold {
            spread,
            first_pass: Duration::from_secs(60),
        }
    }

    fn local() -> LocalFile {
        let manifest = Manifest {
            collection: false,
            name: "x.bin".into(),
            size: 4096,
            chunk_size: 1024,
            hashes: vec![0; 4 * 32].into(),
        };
        let file = tempfile::tempfile().expect("temp file");
        LocalFile::new(Arc::new(manifest), file, "x.bin".into(), Bitfield::full(4))
    }

    #[test]
    fn an_identity_tells_a_rewrite_or_a_replacement_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").expect("write");
        let stat = |p: &std::path::Path| Identity::of(&std::fs::metadata(p).expect("stat"));
        let recorded = stat(&path);
        assert_eq!(recorded.change(&stat(&path)), None, "unchanged");
        // Reading and opening change nothing.
        let _ = std::fs::read(&path).expect("read");
        assert_eq!(recorded.change(&stat(&path)), None);
        let mut grown = recorded;
        grown.size += 1;
        assert_eq!(grown.change(&recorded), Some("its size changed"));
        let mut touched = recorded;
        touched.mtime_ns += 1;
        assert_eq!(
            touched.change(&recorded),
            Some("its modification time changed")
        );
        // An older record without inode and change time compares size and time alone.
        let old = Identity {
            file: None,
            ctime_ns: None,
            ..recorded
        };
        let mut moved = recorded;
        moved.file = moved.file.map(|(ino, dev)| (ino + 1, dev));
        moved.ctime_ns = moved.ctime_ns.map(|c| c + 1);
        assert_eq!(old.change(&moved), None);
        #[cfg(unix)]
        {
            assert_eq!(recorded.change(&moved), Some("another file took its place"));
            // Same size and times, another file: what rsync or `cp -p` then `mv` leave.
            let other = dir.path().join("g");
            std::fs::write(&other, b"two").expect("write");
            std::fs::rename(&other, &path).expect("rename");
            let now = stat(&path);
            let faked = Identity {
                mtime_ns: recorded.mtime_ns,
                ..now
            };
            assert_eq!(recorded.change(&faked), Some("another file took its place"));
        }
    }

    #[test]
    fn a_first_pass_hold_ends_after_its_time_even_if_the_recipient_stays() {
        let f = local();
        let (a, b) = (PeerId::random(), PeerId::random());
        let short = Hold {
            spread: Duration::from_millis(1),
            first_pass: Duration::from_millis(30),
        };
        let all = |_: &PeerId| true;
        assert!(f.may_send(0, a, short, 0, all));
        assert!(!f.may_send(0, b, short, 0, all), "held in the first pass");
        std::thread::sleep(Duration::from_millis(40));
        // Chunks 1 to 3 never went out, a is still fetching: the hold has ended anyway.
        assert!(f.may_send(0, b, short, 0, all));
    }

    #[test]
    fn a_peer_still_downloading_holds_nothing_back() {
        let manifest = Manifest {
            collection: false,
            name: "x.bin".into(),
            size: 4096,
            chunk_size: 1024,
            hashes: vec![0; 4 * 32].into(),
        };
        let mut have = Bitfield::new(4);
        have.set(1);
        let file = tempfile::tempfile().expect("temp file");
        let f = LocalFile::new(Arc::new(manifest), file, "x.bin".into(), have);
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = hold(Duration::from_secs(60));
        assert!(f.may_send(1, a, spread, 0, |_| true));
        f.sent(1, a);
        assert!(f.may_send(1, b, spread, 0, |_| true));
    }

    /// The server asks whether a chunk is held back before it waits for an upload slot, and
    /// only records the send once it has one: asking records nothing.
    #[test]
    fn asking_whether_a_chunk_is_held_back_records_no_send() {
        let f = local();
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = hold(Duration::from_secs(60));
        let fetching = |_: &PeerId| true;
        assert!(!f.holds_back(0, a, spread, 0, fetching));
        assert!(
            !f.holds_back(0, b, spread, 0, fetching),
            "a was never sent it"
        );
        assert!(f.may_send(0, a, spread, 0, fetching));
        assert!(f.holds_back(0, b, spread, 0, fetching));
        assert!(!f.may_send(0, b, spread, 0, fetching));
        assert!(!f.holds_back(0, a, spread, 0, fetching), "a may ask again");
    }

    #[test]
    fn a_whole_file_goes_out_once_before_any_chunk_goes_out_twice() {
        let f = local();
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = hold(Duration::from_millis(1));
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
            assert!(f.may_send(i, c, hold(Duration::ZERO), 0, |_| false));
        }
        let (a, b) = (PeerId::random(), PeerId::random());
        let spread = hold(Duration::from_millis(200));
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
        std::thread::sleep(spread.spread + Duration::from_millis(20));
        assert!(f.may_send(1, a, spread, 0, all));
    }
}
