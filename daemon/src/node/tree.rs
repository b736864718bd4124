//! [`Tree`]: one collection's download (or a collection registered here, complete), its
//! progress and its events; what `status` shows of collections.

use p2p_schema::CollectionStatus;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::store::CollectionRecord;

/// Small files of one collection downloaded at once: each costs round trips more than
/// bandwidth, so several overlap.
pub(super) const PARALLEL_FILES: usize = 8;
/// A file at least this large is downloaded alone: it fills the links by itself, and the
/// buffers of one download are all it needs (a large set costs the memory of one file).
pub(super) const LARGE_FILE: u64 = 8 << 20;

/// How far a collection's download is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeProgress {
    pub files_done: u64,
    pub files: u64,
    pub bytes_done: u64,
    pub bytes: u64,
}

/// What a collection's download tells those following it.
#[derive(Debug, Clone)]
pub enum TreeEvent {
    Progress(TreeProgress),
    Completed,
    Failed(String),
}

/// One collection's download.
pub struct Tree {
    pub id: FileId,
    pub manifest: Arc<Manifest>,
    pub output: PathBuf,
    pub part: PathBuf,
    state: Mutex<DownloadState>,
    progress: Mutex<TreeProgress>,
    pub events: broadcast::Sender<TreeEvent>,
    /// Stops the current run alone (pause, cancel).
    pub(super) halt: Mutex<CancellationToken>,
    /// The download's one task, while it has one.
    pub(super) task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether `part` is this download's own: created by it, or recorded by an earlier run.
    /// It is created only once the index passed its checks, so a refused collection
    /// leaves nothing behind.
    pub(super) reserved: std::sync::atomic::AtomicBool,
}

impl Tree {
    pub(super) fn new(
        manifest: Arc<Manifest>,
        output: PathBuf,
        part: PathBuf,
        state: DownloadState,
        totals: (u64, u64),
    ) -> Tree {
        let (files, bytes) = totals;
        let done = state == DownloadState::Complete;
        Tree {
            id: manifest.file_id(),
            manifest,
            output,
            part,
            state: Mutex::new(state),
            progress: Mutex::new(TreeProgress {
                files_done: if done { files } else { 0 },
                files,
                bytes_done: if done { bytes } else { 0 },
                bytes,
            }),
            events: broadcast::channel(256).0,
            halt: Mutex::new(CancellationToken::new()),
            task: tokio::sync::Mutex::new(None),
            reserved: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> DownloadState {
        lock(&self.state).clone()
    }

    pub fn progress(&self) -> TreeProgress {
        *lock(&self.progress)
    }

    pub(super) fn record(&self) -> CollectionRecord {
        let p = self.progress();
        CollectionRecord {
            manifest: (*self.manifest).clone(),
            output: self.output.to_string_lossy().into_owned(),
            part: self.part.to_string_lossy().into_owned(),
            state: self.state(),
            files: p.files,
            bytes: p.bytes,
        }
    }

    pub(super) fn set_state(&self, node: &Node, state: DownloadState) {
        *lock(&self.state) = state;
        if let Err(e) = node.store.put_collection(&self.id, &self.record()) {
            warn!(error = %e, "saving a collection's state");
        }
    }

    pub(super) fn advance(&self, f: impl FnOnce(&mut TreeProgress)) {
        let now = {
            let mut p = lock(&self.progress);
            f(&mut p);
            *p
        };
        let _ = self.events.send(TreeEvent::Progress(now));
    }

    /// Stops the current run (if any) and waits for its task to end.
    pub(super) async fn halt(&self) {
        let mut task = self.task.lock().await;
        lock(&self.halt).cancel();
        if let Some(t) = task.take() {
            let _ = t.await;
        }
    }
}

pub(super) fn part_taken(part: &Path, output: &Path) -> WireError {
    err(
        ErrorCode::BadRequest,
        format!(
            "{} already exists: another download is writing {}, or one was cancelled; remove it or choose another --output",
            part.display(),
            output.display()
        ),
    )
}

pub(super) fn io(what: String) -> impl FnOnce(std::io::Error) -> WireError {
    move |e| err(ErrorCode::Io, format!("{what}: {e}"))
}

pub(super) fn joined(e: tokio::task::JoinError) -> WireError {
    err(ErrorCode::Internal, e.to_string())
}

impl Node {
    pub(super) fn tree(&self, id: &FileId) -> Option<Arc<Tree>> {
        lock(&self.trees).get(id).cloned()
    }

    /// Collections, for `status`: downloads, and trees shared here.
    pub(super) fn tree_status(&self) -> Vec<CollectionStatus> {
        let trees: Vec<Arc<Tree>> = lock(&self.trees).values().cloned().collect();
        let mut out: Vec<CollectionStatus> = trees
            .iter()
            .map(|t| {
                let p = t.progress();
                CollectionStatus {
                    id: t.id,
                    name: t.manifest.name.clone(),
                    path: t.output.display().to_string(),
                    state: t.state(),
                    files_done: p.files_done,
                    files: p.files,
                    bytes_done: p.bytes_done,
                    bytes: p.bytes,
                    uploaded: self.uploaded_for(&t.id),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// Bytes served of collection `cid`: its index and its files.
    fn uploaded_for(&self, cid: &FileId) -> u64 {
        read_lock(&self.files)
            .values()
            .filter(|f| f.id == *cid || f.collection() == Some(*cid))
            .map(|f| f.uploaded.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}
