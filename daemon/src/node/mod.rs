//! [`Node`]: the catalog of files this daemon can serve (shares and partial downloads), the
//! download manager (`downloads.rs`), bringing back an earlier run's state (`load.rs`), and the
//! operations behind every control command. [`crate::start`] brings it up and down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use p2p_schema::{
    Bitfield, CollectionInfo, DaemonInfo, DownloadState, ErrorCode, FileId, FileSummary, Manifest,
    ShareStatus, StatusReport, TrackerRequest, WireError,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::context::Context;
use crate::download::{self, Download};
use crate::local::LocalFile;
use crate::part::{create_part, open_part, part_error};
use crate::register::{hash_file, share_name};
use crate::store::{DownloadRecord, ShareRecord};
use crate::Error;
use crate::{lock, read_lock, write_lock};

pub type Files = Arc<RwLock<HashMap<FileId, Arc<LocalFile>>>>;

mod downloads;
mod fetch_tree;
mod load;
mod pack;
mod share_tree;
mod tree;
mod tree_fs;
mod tree_ops;

pub use tree::{Tree, TreeEvent, TreeProgress};

/// The catalog of local files (shares and partial downloads, what can be served), the
/// downloads, and the operations behind every control command. Its [`Context`] (settings,
/// identity, database, tracker session) is reached through it.
pub struct Node {
    ctx: Arc<Context>,
    files: Files,
    downloads: Mutex<HashMap<FileId, Arc<Download>>>,
    /// One gate per file a `download` command is starting: a second command for the same
    /// file waits for the first, then finds its download (check-and-insert is atomic).
    starting: Mutex<HashMap<FileId, Arc<tokio::sync::Mutex<()>>>>,
    /// Collections being downloaded (or downloaded), by the ID of their index.
    trees: Mutex<HashMap<FileId, Arc<Tree>>>,
}

impl std::ops::Deref for Node {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.ctx
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

impl Node {
    /// A node over `ctx`, holding `files` (announced to the tracker from there), with no
    /// downloads yet (`Node::load` brings back those of an earlier run).
    pub fn new(ctx: Arc<Context>, files: Files) -> Node {
        Node {
            ctx,
            files,
            downloads: Mutex::default(),
            starting: Mutex::default(),
            trees: Mutex::default(),
        }
    }

    /// The shared context, for the parts that need nothing else.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Every download, for shutdown.
    pub fn downloads(&self) -> Vec<Arc<Download>> {
        lock(&self.downloads).values().cloned().collect()
    }

    /// How many files this daemon holds whole (shares and finished downloads).
    pub fn share_count(&self) -> usize {
        read_lock(&self.files)
            .values()
            .filter(|f| f.is_complete())
            .count()
    }

    /// The file with ID `id`, if this daemon holds any of it.
    pub fn local_file(&self, id: &FileId) -> Option<Arc<LocalFile>> {
        read_lock(&self.files).get(id).cloned()
    }

    fn insert_file(&self, local: Arc<LocalFile>) {
        write_lock(&self.files).insert(local.id, local);
    }

    /// Registers collection `cid`'s large files with the tracker (see [`registration`]).
    fn announce_members(&self, cid: &FileId) {
        let requests: Vec<TrackerRequest> = read_lock(&self.files)
            .values()
            .filter(|f| f.collection() == Some(*cid) && f.is_complete() && f.problem().is_none())
            .filter_map(|f| registration(f))
            .collect();
        for request in requests {
            self.tracker.notify(request);
        }
    }

    fn download(&self, id: &FileId) -> Option<Arc<Download>> {
        lock(&self.downloads).get(id).cloned()
    }

    /// Facts for `p2pctl`.
    pub fn info(&self) -> DaemonInfo {
        DaemonInfo {
            peer_id: self.peer_id,
            listen: self.listen,
            tracker: self.tracker.address(),
            download_dir: self.config.download_dir.display().to_string(),
            agent: p2p_schema::agent("p2pd"),
            key: Some(hex::encode(self.links.key.public())),
            closed: self.config.swarm.is_some(),
            metrics: self.config.metrics,
        }
    }

    /// Hashes the file at `path` and shares it; a directory is shared as one collection
    /// (and what it holds is returned). Hashing progress goes to `progress`.
    pub async fn register(
        &self,
        path: &str,
        chunk_size: Option<u32>,
        progress: mpsc::Sender<(u64, u64)>,
    ) -> Result<(FileSummary, Option<CollectionInfo>), WireError> {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{}: the daemon needs an absolute path", path.display()),
            ));
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            let (file, info) = self.register_tree(path, chunk_size, progress).await?;
            return Ok((file, Some(info)));
        }
        let name = share_name(&path)?;
        let hashed = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                hash_file(&path, name, chunk_size, |done, total| {
                    let _ = progress.try_send((done, total));
                })
            })
            .await
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))??
        };
        let manifest = hashed.manifest;
        let id = manifest.file_id();
        let path_str = utf8(&path)?;
        let record = ShareRecord::new(manifest.clone(), path_str, hashed.identity);
        self.store
            .put_share(&id, &record)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let chunks = manifest.chunk_count();
        let manifest = Arc::new(manifest);
        match self.local_file(&id) {
            Some(f) if f.is_complete() && f.problem().is_none() => {
                // Held already (maybe only as a collection's member): now on its own too.
                f.set_collection(None);
            }
            _ => {
                let local = LocalFile::new(
                    manifest.clone(),
                    hashed.file,
                    path.clone(),
                    Bitfield::full(chunks),
                );
                local.set_source(hashed.identity);
                self.insert_file(Arc::new(local));
            }
        }
        info!(file = %id.short(), path = %path.display(), size = manifest.size, "file shared");
        Ok((self.announce_registered(&manifest).await?, None))
    }

    /// Registers a file just shared with the tracker.
    async fn announce_registered(&self, manifest: &Manifest) -> Result<FileSummary, WireError> {
        match self.tracker.register(manifest.clone()).await {
            Ok(file) => Ok(file),
            Err(e) if e.code == ErrorCode::TrackerUnavailable => Err(err(
                e.code,
                format!(
                    "{} is shared here but not yet announced: {}; it will be announced when the tracker is back",
                    manifest.name, e.message
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// Resolves a name, ID or unique ID prefix to one file on the network.
    pub async fn resolve(&self, query: &str) -> Result<FileSummary, Resolve> {
        let files = self.tracker.find(query).await.map_err(Resolve::Error)?;
        match <[FileSummary; 1]>::try_from(files) {
            Ok([file]) => Ok(file),
            Err(files) if files.is_empty() => Err(Resolve::Error(err(
                ErrorCode::NotFound,
                format!(
                    "no file named {query:?} (nor with that ID) on the network; see 'p2pctl list'"
                ),
            ))),
            Err(files) => Err(Resolve::Ambiguous(files)),
        }
    }

    /// The local download or share matching `query` (a name, ID or unique ID prefix).
    fn find_local(&self, query: &str) -> Result<FileId, WireError> {
        let q = query.to_ascii_lowercase();
        let by_id = p2p_schema::is_hex_prefix(&q);
        let mut ids: Vec<(FileId, String)> = read_lock(&self.files)
            .values()
            .map(|f| (f.id, f.manifest.name.clone()))
            .chain(
                lock(&self.downloads)
                    .values()
                    .map(|d| (d.id, d.manifest.name.clone())),
            )
            .filter(|(id, name)| name == query || (by_id && id.to_hex().starts_with(&q)))
            .collect();
        ids.sort();
        ids.dedup();
        match ids.as_slice() {
            [] => Err(err(
                ErrorCode::NotFound,
                format!("this daemon has no file or download {query:?}; see 'p2pctl status'"),
            )),
            [(id, _)] => Ok(*id),
            many => Err(err(
                ErrorCode::Ambiguous,
                format!(
                    "{query:?} matches {} files here; use an ID: {}",
                    many.len(),
                    many.iter()
                        .map(|(id, _)| id.to_hex())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Stops sharing a file (a registered one or a finished download); the file itself stays.
    pub async fn unregister(&self, query: &str) -> Result<FileSummary, WireError> {
        if let Some(cid) = self.find_collection(query) {
            return self.unregister_tree(&cid).await;
        }
        let id = self.find_local(query)?;
        if let Some(dl) = self.download(&id) {
            if dl.state() != DownloadState::Complete {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} is still being downloaded; use 'p2pctl cancel'",
                        dl.manifest.name
                    ),
                ));
            }
        }
        let manifest = self
            .local_file(&id)
            .map(|f| f.manifest.clone())
            .ok_or_else(|| err(ErrorCode::NotFound, "not shared here"))?;
        self.forget(&id).await?;
        info!(file = %id.short(), "stopped sharing");
        Ok(local_summary(&manifest))
    }

    /// Forgets everything about file `id`: records, chunks, serving, the tracker's holding.
    async fn forget(&self, id: &FileId) -> Result<(), WireError> {
        self.forget_quietly(id)?;
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        self.tracker.notify(TrackerRequest::Drop { file_id: *id });
        Ok(())
    }

    /// Forgets file `id` here (records, chunks, serving), without a flush and without telling
    /// the tracker: for a collection's files, which it never heard of one by one; the caller
    /// flushes once for them all.
    fn forget_quietly(&self, id: &FileId) -> Result<(), WireError> {
        write_lock(&self.files).remove(id);
        lock(&self.downloads).remove(id);
        let io = |e: Error| err(ErrorCode::Io, e.to_string());
        self.store.remove_share(id).map_err(io)?;
        self.store.remove_download(id).map_err(io)?;
        self.store.clear_chunks(id).map_err(io)
    }

    /// What this daemon shares and downloads.
    pub fn status(&self) -> StatusReport {
        let mut shares: Vec<ShareStatus> = read_lock(&self.files)
            .values()
            .filter(|f| f.is_complete() && f.collection().is_none() && !f.manifest.collection)
            .map(|f| ShareStatus {
                id: f.id,
                name: f.manifest.name.clone(),
                size: f.manifest.size,
                chunks: f.manifest.chunk_count(),
                path: f.path().display().to_string(),
                uploaded: f.uploaded.load(std::sync::atomic::Ordering::Relaxed),
                problem: f.problem(),
            })
            .collect();
        shares.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut downloads: Vec<_> = lock(&self.downloads)
            .values()
            .filter(|d| d.local.collection().is_none() && !d.manifest.collection)
            .map(|d| d.status())
            .collect();
        downloads.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        StatusReport {
            info: self.info(),
            tracker_connected: self.tracker.is_connected(),
            tracker_problem: self.tracker.problem(),
            shares,
            downloads,
            collections: self.tree_status(),
        }
    }
}

/// A summary of a local file, for replies that need no tracker.
fn local_summary(m: &Manifest) -> FileSummary {
    FileSummary {
        id: m.file_id(),
        name: m.name.clone(),
        size: m.size,
        chunk_size: m.chunk_size,
        chunks: m.chunk_count(),
        seeders: 0,
        holders: 0,
        collection: m.collection,
    }
}

fn utf8(p: &Path) -> Result<String, WireError> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        err(
            ErrorCode::BadRequest,
            format!("{}: paths must be valid UTF-8", p.display()),
        )
    })
}

/// Why a query did not resolve to one file.
pub enum Resolve {
    Ambiguous(Vec<FileSummary>),
    Error(WireError),
}

/// A file held only for a collection is registered with the tracker on its own too, as a
/// member (found by its ID, not listed), from this size on: whoever fetches the same bytes
/// alone then finds this daemon as well. Smaller ones are found through their collection
/// only, so the tracker keeps at most one record per holder for every 8 MiB held.
pub const MEMBER_ANNOUNCED: u64 = 8 << 20;

/// How the tracker hears of complete file `f` on its own, if it does (see
/// [`MEMBER_ANNOUNCED`]).
pub(crate) fn registration(f: &LocalFile) -> Option<TrackerRequest> {
    let member = f.collection().is_some();
    (!member || f.manifest.size >= MEMBER_ANNOUNCED).then(|| TrackerRequest::Register {
        manifest: (*f.manifest).clone(),
        member,
    })
}

/// What to announce after (re)connecting: complete files first (registering them), then
/// partial holdings.
pub fn announce_all(files: &Files) -> Vec<TrackerRequest> {
    let files = read_lock(files);
    let (stale, usable): (Vec<_>, Vec<_>) = files.values().partition(|f| f.problem().is_some());
    let (complete, partial): (Vec<_>, Vec<_>) = usable.into_iter().partition(|f| f.is_complete());
    // The tracker may still list files we no longer serve (from before a restart).
    let mut out: Vec<TrackerRequest> = stale
        .into_iter()
        .map(|f| TrackerRequest::Drop { file_id: f.id })
        .collect();
    out.extend(complete.into_iter().filter_map(|f| registration(f)));
    // A collection's partial files are found through the collection.
    out.extend(
        partial
            .into_iter()
            .filter(|f| f.collection().is_none())
            .map(|f| (f.id, f.have()))
            .filter(|(_, have)| have.count() > 0)
            .map(|(file_id, chunks)| TrackerRequest::Have { file_id, chunks }),
    );
    out
}
