//! The registry: files, peers and who holds which chunks, held in memory.
//!
//! Files and peers are written through to sled, so that a restarted tracker lists the same
//! files and knows the same peers; who holds what is soft state, rebuilt from the daemons,
//! which announce everything they hold whenever their session (re)starts. Not writing it keeps
//! a holding in about 200 bytes of memory instead of 3.7 KB (3.4 KB of it sled's, at 200,000
//! holdings: `bench/run --only tracker`), and a chunk gained costs no write.
//!
//! sled trees (keys big-endian, values CBOR):
//! - `files`: `FileId` -> [`Manifest`]
//! - `members`: `FileId` -> empty: files registered only as collections' members, found by
//!   ID but not listed (absent from what earlier versions wrote: all their files are listed)
//! - `peers`: `PeerId` -> `PeerRecord`
//! - (`holdings`, written by earlier versions, is dropped on opening.)
//!
//! A file lives as long as some peer holds part of it; files loaded at start-up get one TTL
//! for their holders to come back. A peer lives until it says `Bye` or nothing has been heard
//! from it for the TTL; peers loaded at start-up get one TTL to come back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2p_schema::{
    is_hex_prefix, Bitfield, ErrorCode, FileId, FileSummary, Holder, ListCursor, Manifest, PeerId,
    TrackerStats, WireError,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::Error;
use holders::{sample, FileEntry, Holding};

mod holders;

/// What is kept of a peer across restarts.
#[derive(Serialize, Deserialize)]
struct PeerRecord {
    addr: SocketAddr,
}

struct PeerEntry {
    addr: SocketAddr,
    last_seen: Instant,
    files: HashSet<FileId>,
}

#[derive(Default)]
struct State {
    files: HashMap<FileId, FileEntry>,
    peers: HashMap<PeerId, PeerEntry>,
    /// When files loaded at start-up that nobody announced again are dropped.
    sweep_at: Option<Instant>,
}

/// The tracker's registry. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Registry {
    db: sled::Db,
    files: sled::Tree,
    members: sled::Tree,
    peers: sled::Tree,
    state: Mutex<State>,
    ttl: Duration,
    requests: AtomicU64,
    /// Most files one peer may hold (register, or announce holdings of) at once.
    max_files_per_peer: std::sync::atomic::AtomicUsize,
}

/// Files one peer may hold at once unless configured otherwise.
pub const DEFAULT_MAX_FILES_PER_PEER: usize = 100_000;

use p2p_service::store::to_cbor as cbor;

fn not_found(what: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::NotFound, what)
}

impl Registry {
    /// Opens (or creates) the registry in `dir`, loading what a previous run left.
    ///
    /// The database is opened by the rule both programs share ([`p2p_service::store`]): one
    /// another tracker holds is waited for, then reported as in use and left alone; only one
    /// that fails its checks on opening is moved aside and a fresh one started (daemons
    /// re-announce what they hold when they reconnect). Blocks: call it off the executor.
    pub fn open(dir: &Path, ttl: Duration) -> Result<Registry, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("creating data directory {}", dir.display()), e))?;
        let config = |c: sled::Config| c.cache_capacity(64 << 20).flush_every_ms(Some(500));
        let db = p2p_service::store::open("p2p-tracker", dir, "registry.sled", config)?.db;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| Error::Db(format!("opening tree {name}"), e))
        };
        let registry = Registry {
            files: tree("files")?,
            members: tree("members")?,
            peers: tree("peers")?,
            db,
            state: Mutex::new(State::default()),
            ttl,
            requests: AtomicU64::new(0),
            max_files_per_peer: DEFAULT_MAX_FILES_PER_PEER.into(),
        };
        // Holdings are soft state now: what an earlier version wrote is not needed.
        if let Err(e) = registry.db.drop_tree("holdings") {
            warn!(error = %e, "dropping the holdings an earlier version wrote");
        }
        registry.load()?;
        Ok(registry)
    }

    fn load(&self) -> Result<(), Error> {
        let now = Instant::now();
        let mut state = self.lock();
        let db_err = |e| Error::Db("reading registry".into(), e);
        for item in self.files.iter() {
            let (k, v) = item.map_err(db_err)?;
            let (Some(id), Ok(manifest)) = (
                FileId::from_slice(&k),
                ciborium::from_reader::<Manifest, _>(&v[..]),
            ) else {
                warn!("skipping an unreadable file record");
                continue;
            };
            state.files.insert(id, FileEntry::new(Arc::new(manifest)));
        }
        for item in self.members.iter() {
            let (k, _) = item.map_err(db_err)?;
            if let Some(f) = FileId::from_slice(&k).and_then(|id| state.files.get_mut(&id)) {
                f.member = true;
            }
        }
        for item in self.peers.iter() {
            let (k, v) = item.map_err(db_err)?;
            let (Some(id), Ok(rec)) = (
                PeerId::from_slice(&k),
                ciborium::from_reader::<PeerRecord, _>(&v[..]),
            ) else {
                warn!("skipping an unreadable peer record");
                continue;
            };
            state.peers.insert(
                id,
                PeerEntry {
                    addr: rec.addr,
                    last_seen: now,
                    files: HashSet::new(),
                },
            );
        }
        state.sweep_at = Some(now + self.ttl);
        info!(
            files = state.files.len(),
            peers = state.peers.len(),
            "registry loaded"
        );
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the most files one peer may hold at once.
    pub fn set_max_files_per_peer(&self, n: usize) {
        self.max_files_per_peer.store(n, Ordering::Relaxed);
    }

    /// Refuses a claim on a file new to `peer` once it holds its quota of files.
    fn check_quota(&self, state: &State, peer: &PeerId, id: &FileId) -> Result<(), WireError> {
        let max = self.max_files_per_peer.load(Ordering::Relaxed);
        match state.peers.get(peer) {
            Some(p) if !p.files.contains(id) && p.files.len() >= max => Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "this peer already holds {max} files, the most the tracker takes from one peer"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Counts one request (for stats).
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A peer opened a session. Returns whether it is new and how many peers there are.
    pub fn hello(&self, peer: PeerId, addr: SocketAddr) -> (bool, usize) {
        let mut state = self.lock();
        let now = Instant::now();
        let new = match state.peers.get_mut(&peer) {
            Some(p) => {
                p.last_seen = now;
                if p.addr != addr {
                    p.addr = addr;
                    let _ = self.peers.insert(peer.0, cbor(&PeerRecord { addr }));
                }
                false
            }
            None => {
                state.peers.insert(
                    peer,
                    PeerEntry {
                        addr,
                        last_seen: now,
                        files: HashSet::new(),
                    },
                );
                let _ = self.peers.insert(peer.0, cbor(&PeerRecord { addr }));
                true
            }
        };
        (new, state.peers.len())
    }

    /// Something was heard from `peer`. Returns false if the peer is unknown (it expired, or
    /// the tracker lost it): the session must say hello again.
    pub fn touch(&self, peer: &PeerId) -> bool {
        match self.lock().peers.get_mut(peer) {
            Some(p) => {
                p.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Registers a manifest with `peer` holding all of it; a `member` (a collection's file)
    /// is found by ID but not listed, until someone registers the same file alone. Also says
    /// whether the file is new to the registry or newly listed (worth a flush: holdings are
    /// re-announced by daemons anyway).
    pub fn register(
        &self,
        peer: PeerId,
        manifest: Manifest,
        member: bool,
    ) -> Result<(FileSummary, bool), WireError> {
        manifest
            .validate()
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
        let id = manifest.file_id();
        let mut state = self.lock();
        self.check_quota(&state, &peer, &id)?;
        let new = match state.files.entry(id) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                if member {
                    let _ = self.members.insert(id.0, &[]);
                }
                let _ = self.files.insert(id.0, cbor(&manifest));
                let mut entry = FileEntry::new(Arc::new(manifest));
                entry.member = member;
                slot.insert(entry);
                true
            }
            // Registered alone at last: listed from now on, under the name given alone.
            std::collections::hash_map::Entry::Occupied(mut slot)
                if slot.get().member && !member =>
            {
                let _ = self.files.insert(id.0, cbor(&manifest));
                let _ = self.members.remove(id.0);
                let entry = slot.get_mut();
                entry.manifest = Arc::new(manifest);
                entry.member = false;
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        };
        self.set_holding(&mut state, peer, id, Holding::All)?;
        Ok((summary(&state, &id), new))
    }

    /// Replaces what `peer` holds of file `id`.
    pub fn have(&self, peer: PeerId, id: FileId, chunks: Bitfield) -> Result<(), WireError> {
        let mut state = self.lock();
        let file = state
            .files
            .get(&id)
            .ok_or_else(|| not_found(format!("no file {id}")))?;
        let chunks = chunks
            .checked(file.manifest.chunk_count())
            .ok_or_else(|| WireError::new(ErrorCode::BadRequest, "bitfield has the wrong size"))?;
        if chunks.count() == 0 {
            self.drop_holding(&mut state, peer, id);
            return Ok(());
        }
        self.set_holding(&mut state, peer, id, Holding::of(chunks))
    }

    /// Adds chunks to what `peer` holds of file `id`.
    pub fn gained(&self, peer: PeerId, id: FileId, indices: &[u32]) -> Result<(), WireError> {
        let mut state = self.lock();
        let file = state
            .files
            .get_mut(&id)
            .ok_or_else(|| not_found(format!("no file {id}")))?;
        let n = file.manifest.chunk_count();
        if indices.iter().any(|&i| i >= n) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "chunk index out of range",
            ));
        }
        let mut bits = match file.holding_mut(&peer) {
            Some(Holding::All) => return Ok(()),
            // Grown in place: a chunk gained costs no copy of the bitfield.
            Some(Holding::Some(bits)) => {
                for &i in indices {
                    bits.set(i);
                }
                if bits.is_full() {
                    file.set(peer, Holding::All);
                }
                return Ok(());
            }
            None => Bitfield::new(n),
        };
        for &i in indices {
            bits.set(i);
        }
        self.set_holding(&mut state, peer, id, Holding::of(bits))
    }

    fn set_holding(
        &self,
        state: &mut State,
        peer: PeerId,
        id: FileId,
        holding: Holding,
    ) -> Result<(), WireError> {
        self.check_quota(state, &peer, &id)?;
        let p = state
            .peers
            .get_mut(&peer)
            .ok_or_else(|| not_found("unknown peer: say hello first"))?;
        p.files.insert(id);
        if let Some(f) = state.files.get_mut(&id) {
            f.set(peer, holding);
        }
        Ok(())
    }

    /// `peer` no longer holds file `id`.
    pub fn drop_file(&self, peer: PeerId, id: FileId) {
        let mut state = self.lock();
        self.drop_holding(&mut state, peer, id);
    }

    fn drop_holding(&self, state: &mut State, peer: PeerId, id: FileId) {
        if let Some(p) = state.peers.get_mut(&peer) {
            p.files.remove(&id);
        }
        let empty = match state.files.get_mut(&id) {
            // A file loaded at start-up waits for its holders to come back: one that never
            // held it saying so does not end it.
            Some(f) => f.remove(&peer) && f.holders.is_empty(),
            None => false,
        };
        if empty {
            self.forget_file(state, &id);
        }
    }

    /// Removes a peer and everything it holds. Returns its address and how many peers remain,
    /// or `None` if it was not known.
    pub fn remove_peer(&self, peer: &PeerId) -> Option<(SocketAddr, usize)> {
        let mut state = self.lock();
        let entry = state.peers.remove(peer)?;
        let _ = self.peers.remove(peer.0);
        for id in entry.files {
            self.drop_holding(&mut state, *peer, id);
        }
        Some((entry.addr, state.peers.len()))
    }

    /// Removes every peer not heard from for the TTL. Returns each one's address and how many
    /// peers remained after it left.
    pub fn expire(&self) -> Vec<(SocketAddr, usize)> {
        let now = Instant::now();
        let stale: Vec<PeerId> = self
            .lock()
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_seen) > self.ttl)
            .map(|(id, _)| *id)
            .collect();
        self.sweep(now);
        stale.iter().filter_map(|id| self.remove_peer(id)).collect()
    }

    /// Once the start-up grace period is over, drops the files loaded at start-up that no
    /// holder announced again.
    fn sweep(&self, now: Instant) {
        let mut state = self.lock();
        if state.sweep_at.is_none_or(|at| now < at) {
            return;
        }
        state.sweep_at = None;
        let orphans: Vec<FileId> = state
            .files
            .iter()
            .filter(|(_, f)| f.holders.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            self.forget_file(&mut state, &id);
        }
    }

    /// Forgets file `id`, in memory and on disk.
    fn forget_file(&self, state: &mut State, id: &FileId) {
        if state.files.remove(id).is_some_and(|f| f.member) {
            let _ = self.members.remove(id.0);
        }
        let _ = self.files.remove(id.0);
    }

    /// All files but collections' members, sorted by name then ID.
    pub fn list(&self) -> Vec<FileSummary> {
        let state = self.lock();
        let mut out: Vec<FileSummary> = state
            .files
            .iter()
            .filter(|(_, f)| !f.member)
            .map(|(id, _)| summary(&state, id))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// One page of [`Self::list`]: at most `limit` files after `after`, and where the next
    /// page starts (`None` after the last).
    pub fn list_page(
        &self,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> (Vec<FileSummary>, Option<ListCursor>) {
        let state = self.lock();
        let key = |f: &FileEntry, id: &FileId| (f.manifest.name.clone(), *id);
        let mut keys: Vec<(String, FileId)> = state
            .files
            .iter()
            .filter(|(_, f)| !f.member)
            .map(|(id, f)| key(f, id))
            .filter(|k| after.is_none_or(|c| (&k.0, &k.1) > (&c.name, &c.id)))
            .collect();
        keys.sort();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let files: Vec<FileSummary> = keys.iter().map(|(_, id)| summary(&state, id)).collect();
        let next = more
            .then(|| keys.last())
            .flatten()
            .map(|(name, id)| ListCursor {
                name: name.clone(),
                id: *id,
            });
        (files, next)
    }

    /// Files whose full ID, ID prefix or name is `query`.
    pub fn find(&self, query: &str) -> Vec<FileSummary> {
        let state = self.lock();
        let q = query.to_ascii_lowercase();
        let by_id = is_hex_prefix(&q);
        let mut out: Vec<FileSummary> = state
            .files
            .iter()
            .filter(|(id, f)| {
                // A member is found by its ID only: its name belongs to its collection.
                (f.manifest.name == query && !f.member) || (by_id && id.to_hex().starts_with(&q))
            })
            .map(|(id, _)| summary(&state, id))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// The manifest of file `id`.
    pub fn manifest(&self, id: &FileId) -> Result<Arc<Manifest>, WireError> {
        self.lock()
            .files
            .get(id)
            .map(|f| f.manifest.clone())
            .ok_or_else(|| not_found(format!("no file {id}")))
    }

    /// Live holders of file `id` other than `except`: at most `max`, in random order. With
    /// `brief`, without what each holds (only whether it holds everything): the answer stays
    /// small however many chunks the file has, and the asker learns the rest from the peers.
    pub fn locate(
        &self,
        id: &FileId,
        except: Option<&PeerId>,
        max: usize,
        brief: bool,
    ) -> Result<(FileSummary, Vec<Holder>), WireError> {
        let state = self.lock();
        let file = state
            .files
            .get(id)
            .ok_or_else(|| not_found(format!("no file {id}")))?;
        // A few picked at random: a file with thousands of holders costs no pass over them.
        let holders = sample(file.holders.len(), max.saturating_add(1))
            .into_iter()
            .filter_map(|i| {
                let (pid, holding) = file.holders.get(i)?;
                Some(Holder {
                    peer_id: *pid,
                    addr: state.peers.get(pid)?.addr,
                    complete: holding.is_all(),
                    // In full, every holder's bitfield: daemons from before `complete`
                    // read only that.
                    chunks: match holding {
                        _ if brief => Bitfield::new(0),
                        Holding::Some(bits) => (**bits).clone(),
                        Holding::All => Bitfield::full(file.manifest.chunk_count()),
                    },
                })
            })
            .filter(|h| Some(&h.peer_id) != except)
            .take(max)
            .collect();
        Ok((summary(&state, id), holders))
    }

    /// Counters.
    pub fn stats(&self) -> TrackerStats {
        let state = self.lock();
        TrackerStats {
            files: state.files.len() as u64,
            peers: state.peers.len() as u64,
            holdings: state.files.values().map(|f| f.holders.len() as u64).sum(),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    /// Writes everything to disk (fsync).
    pub async fn flush(&self) -> Result<(), Error> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| Error::Db("flushing registry".into(), e))
    }
}

fn summary(state: &State, id: &FileId) -> FileSummary {
    let f = &state.files[id];
    let chunks = f.manifest.chunk_count();
    FileSummary {
        collection: f.manifest.collection,
        id: *id,
        name: f.manifest.name.clone(),
        size: f.manifest.size,
        chunk_size: f.manifest.chunk_size,
        chunks,
        seeders: f.seeders,
        holders: f.holders.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_schema::ManifestBuilder;

    fn manifest(name: &str, fill: u8, size: usize) -> Manifest {
        let mut b = ManifestBuilder::new(1024);
        b.update(&vec![fill; size]);
        b.finish(name.into())
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn pages_give_the_whole_list_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let a = PeerId([1; 16]);
        reg.hello(a, addr(1));
        // Some names repeat: the ID breaks the tie.
        for i in 0..23u8 {
            let name = format!("f{}", i % 7);
            reg.register(a, manifest(&name, i, 1000 + usize::from(i)), false)
                .unwrap();
        }
        let all = reg.list();
        assert_eq!(all.len(), 23);
        for limit in [1, 5, 22, 23, 100] {
            let (mut paged, mut after) = (Vec::new(), None);
            loop {
                let (files, next) = reg.list_page(after.as_ref(), limit);
                assert!(files.len() <= limit);
                paged.extend(files);
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(paged, all, "limit {limit}");
        }
    }

    #[test]
    fn a_peer_holds_at_most_its_quota_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        reg.set_max_files_per_peer(2);
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        reg.hello(a, addr(1));
        reg.hello(b, addr(2));
        let ids: Vec<FileId> = (1..=2)
            .map(|i| reg.register(b, manifest("f", i, 3000), false).unwrap().0.id)
            .collect();
        reg.register(a, manifest("f", 1, 3000), false).unwrap();
        reg.gained(a, ids[1], &[0]).unwrap();
        let e = reg.register(a, manifest("f", 9, 3000), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        // Neither the refused file nor a claim on a third file got in.
        assert_eq!(reg.find("f").len(), 2, "b's files only");
        assert_eq!(
            reg.have(a, ids[0], Bitfield::full(3)),
            Ok(()),
            "a file it holds"
        );
        assert!(
            reg.register(b, manifest("f", 4, 3000), false).is_err(),
            "b is at its quota too"
        );
    }

    #[test]
    fn register_locate_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        assert_eq!(reg.hello(a, addr(1)), (true, 1));
        assert_eq!(reg.hello(b, addr(2)), (true, 2));
        let m = manifest("doug.png", 1, 5000);
        let (s, new) = reg.register(a, m.clone(), false).unwrap();
        assert!(new);
        assert_eq!((s.chunks, s.seeders, s.holders), (5, 1, 1));
        // Same content under another name is the same file.
        let (s2, _) = reg.register(b, manifest("copy.png", 1, 5000), false).unwrap();
        assert!(!reg.register(b, manifest("copy.png", 1, 5000), false).unwrap().1);
        assert_eq!(s2.id, s.id);
        assert_eq!(s2.seeders, 2);
        assert_eq!(reg.list().len(), 1);
        assert_eq!(reg.find("doug.png").len(), 1);
        assert_eq!(reg.find(&s.id.to_hex()[..6]).len(), 1);
        assert!(reg.find("nope").is_empty());

        let (_, holders) = reg.locate(&s.id, Some(&a), 10, false).unwrap();
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].addr, addr(2));

        reg.remove_peer(&a);
        reg.remove_peer(&b);
        assert!(reg.list().is_empty(), "a file nobody holds is gone");
        assert!(reg.locate(&s.id, None, 10, false).is_err());
    }

    #[test]
    fn a_brief_locate_answer_stays_small_whatever_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        // 16,384 chunks (the most a file gets by default), 64 holders: half whole, half not.
        let m = manifest("big", 1, 16_384 * 1024);
        let seeder = PeerId([200; 16]);
        reg.hello(seeder, addr(1));
        let id = reg.register(seeder, m, false).unwrap().0.id;
        for k in 0..63u8 {
            let p = PeerId([k; 16]);
            reg.hello(p, addr(100 + u16::from(k)));
            let held = if k % 2 == 0 { 16_384 } else { 1000 };
            reg.gained(p, id, &(0..held).collect::<Vec<_>>()).unwrap();
        }
        let size = |brief| {
            let (file, holders) = reg.locate(&id, None, 64, brief).unwrap();
            let answer = p2p_schema::TrackerResponse::Holders { file, holders };
            let mut bytes = Vec::new();
            p2p_schema::frame::encode_frame(&answer, &mut bytes).unwrap();
            bytes.len()
        };
        let (brief, full) = (size(true), size(false));
        assert!(brief < 64 * 80, "{brief} bytes for 64 holders");
        assert!(full > 64 * 2048, "{full}");
        let (_, holders) = reg.locate(&id, None, 64, false).unwrap();
        for h in &holders {
            assert_eq!(h.chunks.len(), 16_384);
            assert_eq!(h.complete, h.chunks.is_full());
        }
        let (_, holders) = reg.locate(&id, None, 64, true).unwrap();
        assert_eq!(holders.len(), 64);
        let complete = holders.iter().filter(|h| h.complete).count();
        assert_eq!(complete, 33, "the seeder and the 32 that hold everything");
        assert!(holders.iter().all(|h| h.chunks.is_empty()));
    }

    #[test]
    fn partial_holdings_grow() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        reg.hello(a, addr(1));
        reg.hello(b, addr(2));
        let (s, _) = reg.register(a, manifest("f", 2, 4000), false).unwrap();
        reg.gained(b, s.id, &[0, 2]).unwrap();
        assert!(reg.gained(b, s.id, &[4]).is_err(), "index out of range");
        let (sum, holders) = reg.locate(&s.id, Some(&a), 10, false).unwrap();
        assert_eq!(sum.holders, 2);
        assert_eq!(sum.seeders, 1);
        assert_eq!(holders[0].chunks.iter().collect::<Vec<_>>(), vec![0, 2]);
        assert!(reg.have(b, s.id, Bitfield::full(3)).is_err(), "wrong size");
        reg.have(b, s.id, Bitfield::new(4)).unwrap();
        assert_eq!(reg.locate(&s.id, None, 10, false).unwrap().0.holders, 1);
    }

    #[test]
    fn a_collections_member_is_found_by_id_but_listed_only_once_registered_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        let listed = |reg: &Registry| -> Vec<String> {
            let paged = reg.list_page(None, 10).0;
            assert_eq!(paged, reg.list());
            paged.into_iter().map(|f| f.name).collect()
        };
        let id = {
            let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
            reg.hello(a, addr(1));
            let (s, new) = reg
                .register(a, manifest("shard.bin", 4, 3000), true)
                .unwrap();
            assert!(new);
            reg.register(a, manifest("plain", 5, 3000), false).unwrap();
            assert_eq!(listed(&reg), ["plain"]);
            assert!(reg.find("shard.bin").is_empty(), "found by its name");
            assert_eq!(reg.find(&s.id.to_hex()[..12]).len(), 1);
            let (_, holders) = reg.locate(&s.id, None, 10, false).unwrap();
            assert_eq!(holders.len(), 1);
            reg.db.flush().unwrap();
            s.id
        };
        {
            let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
            assert_eq!(listed(&reg), ["plain"], "a member listed after a restart");
            assert!(reg.manifest(&id).is_ok());
            // The same bytes registered alone, under another name: listed from now on.
            reg.hello(b, addr(2));
            let (s, newly_listed) = reg.register(b, manifest("alone", 4, 3000), false).unwrap();
            assert!(newly_listed);
            assert_eq!(s.id, id);
            assert_eq!(listed(&reg), ["alone", "plain"]);
            // Registered again as a member by its first holder: still listed.
            reg.register(a, manifest("shard.bin", 4, 3000), true).unwrap();
            assert_eq!(listed(&reg), ["alone", "plain"]);
            reg.db.flush().unwrap();
        }
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(listed(&reg), ["alone", "plain"]);
        assert_eq!(reg.find("alone").len(), 1);
    }

    #[test]
    fn survives_reopen_and_expires_peers_that_do_not_return() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(50);
        let id = {
            let reg = Registry::open(dir.path(), ttl).unwrap();
            reg.hello(PeerId([1; 16]), addr(1));
            let (s, _) = reg
                .register(PeerId([1; 16]), manifest("f", 3, 3000), false)
                .unwrap();
            reg.db.flush().unwrap();
            s.id
        };
        let reg = Registry::open(dir.path(), ttl).unwrap();
        assert_eq!(
            reg.list().len(),
            1,
            "the file is listed before anyone announces it"
        );
        assert!(
            reg.locate(&id, None, 10, false).unwrap().1.is_empty(),
            "holdings are soft: nobody holds it until announced again"
        );
        // A peer that never held it dropping it (as daemons do for files they no longer
        // have) does not end the wait for its holders.
        reg.hello(PeerId([2; 16]), addr(2));
        reg.drop_file(PeerId([2; 16]), id);
        assert!(reg.have(PeerId([2; 16]), id, Bitfield::new(3)).is_ok());
        assert_eq!(reg.list().len(), 1, "still waiting for its holders");
        assert!(reg.expire().is_empty(), "a fresh grace period");
        std::thread::sleep(Duration::from_millis(80));
        let mut gone: Vec<SocketAddr> = reg.expire().into_iter().map(|(a, _)| a).collect();
        gone.sort();
        assert_eq!(gone, vec![addr(1), addr(2)]);
        assert!(
            reg.list().is_empty(),
            "nobody announced it again in the grace period"
        );
    }

    #[test]
    fn holders_come_and_go_and_locate_picks_distinct_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let peers: Vec<PeerId> = (0..=255u8).map(|k| PeerId([k; 16])).collect();
        for (k, p) in peers.iter().enumerate() {
            reg.hello(*p, addr(1000 + k as u16));
        }
        let id = reg.register(peers[0], manifest("f", 1, 8000), false).unwrap().0.id;
        for p in &peers[1..] {
            reg.gained(*p, id, &[0]).unwrap();
        }
        // Every third leaves; every fifth of the rest completes, in two steps.
        for p in peers.iter().skip(1).step_by(3) {
            reg.remove_peer(p);
        }
        let live: Vec<PeerId> = peers
            .iter()
            .enumerate()
            .filter(|(k, _)| *k == 0 || (k - 1) % 3 != 0)
            .map(|(_, p)| *p)
            .collect();
        for p in live.iter().skip(1).step_by(5) {
            reg.gained(*p, id, &[1, 2, 3]).unwrap();
            reg.gained(*p, id, &[4, 5, 6, 7]).unwrap();
        }
        let complete = 1 + live.iter().skip(1).step_by(5).count() as u32;
        let (summary, _) = reg.locate(&id, None, 1, true).unwrap();
        assert_eq!(
            (summary.holders, summary.seeders),
            (live.len() as u32, complete)
        );
        for max in [1, 10, 50, 1000] {
            let (_, holders) = reg.locate(&id, Some(&peers[0]), max, true).unwrap();
            let ids: HashSet<PeerId> = holders.iter().map(|h| h.peer_id).collect();
            assert_eq!(holders.len(), max.min(live.len() - 1), "max {max}");
            assert_eq!(ids.len(), holders.len(), "distinct");
            assert!(!ids.contains(&peers[0]), "the asker is left out");
            assert!(ids.iter().all(|p| live.contains(p)), "only live holders");
            for h in &holders {
                let k = peers.iter().position(|p| *p == h.peer_id).unwrap();
                assert_eq!(h.addr, addr(1000 + k as u16));
            }
        }
    }

    #[test]
    fn invalid_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        reg.hello(PeerId([1; 16]), addr(1));
        let mut m = manifest("../etc", 1, 10);
        assert!(reg.register(PeerId([1; 16]), m.clone(), false).is_err());
        m.name = "ok".into();
        m.hashes = m.hashes[..m.hashes.len() - 1].into();
        assert!(reg.register(PeerId([1; 16]), m, false).is_err());
    }
}
