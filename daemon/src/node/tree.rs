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

/// The directory, inside a tree being built, for this daemon's temporary files (partial
/// files, copies, files being unpacked). Its name holds a control character, which no entry
/// of a collection may: no temporary name can ever be one of the tree's paths.
pub(super) const SCRATCH: &str = "\u{1}p2p-scratch";

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
    /// A file's download cannot go on for now (a full disk): it goes on by itself.
    Stalled(String),
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
    /// Why it cannot go on for now, while it cannot (see [`TreeEvent::Stalled`]).
    blocked: Mutex<Option<String>>,
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
            blocked: Mutex::new(None),
        }
    }

    /// Where this download's temporary files go (see [`SCRATCH`]).
    pub(super) fn scratch(&self) -> PathBuf {
        self.part.join(SCRATCH)
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
            reserved: self.reserved.load(std::sync::atomic::Ordering::Relaxed),
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

    /// One of its files' downloads stalled, for `why`.
    pub(super) fn stall(&self, why: String) {
        *lock(&self.blocked) = Some(why.clone());
        let _ = self.events.send(TreeEvent::Stalled(why));
    }

    /// Its files' downloads go on.
    pub(super) fn unstall(&self) {
        lock(&self.blocked).take();
    }

    /// Why it cannot go on, if it cannot.
    pub(super) fn blocked(&self) -> Option<String> {
        lock(&self.blocked).clone()
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
    /// Waits until `dl` completes (`Ok(true)`), fails (its reason), or `stop` (`Ok(false)`);
    /// `tree`, if given, is told of the bytes as chunks arrive, and of stalls.
    pub(super) async fn wait_download(
        &self,
        dl: &Arc<download::Download>,
        stop: &CancellationToken,
        tree: Option<&Tree>,
    ) -> Result<bool, WireError> {
        let mut events = dl.events.subscribe();
        let failed = |why: String| err(ErrorCode::Io, format!("{}: {why}", dl.output.display()));
        match dl.state() {
            DownloadState::Complete => return Ok(true),
            DownloadState::Failed(why) => return Err(failed(why)),
            _ => {}
        }
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return Ok(false),
                e = events.recv() => e,
            };
            match event {
                Ok(download::Event::Chunk { index, .. }) => {
                    if let Some((_, len)) = dl.manifest.chunk_range(index) {
                        if let Some(t) = tree {
                            t.advance(|p| p.bytes_done += u64::from(len));
                            t.unstall();
                        }
                    }
                }
                Ok(download::Event::Completed { .. }) => return Ok(true),
                Ok(download::Event::Failed(why)) => {
                    if stop.is_cancelled() {
                        return Ok(false);
                    }
                    return Err(failed(why));
                }
                // It goes on by itself once it can; those following the tree are told.
                Ok(download::Event::Stalled(why)) => {
                    if let Some(t) = tree {
                        t.stall(why);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return match dl.state() {
                        DownloadState::Complete => Ok(true),
                        DownloadState::Failed(why) => Err(failed(why)),
                        _ => Ok(false),
                    }
                }
            }
        }
    }

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
                    blocked: t.blocked().or_else(|| self.unheld(&t.id)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// For a collection being downloaded: how many chunks of its files no live holder has,
    /// if any.
    fn unheld(&self, cid: &FileId) -> Option<String> {
        let (chunks, files) = lock(&self.downloads)
            .values()
            .filter(|d| d.local.collection() == Some(*cid) && d.state() == DownloadState::Running)
            .map(|d| d.status().stalled)
            .filter(|&n| n > 0)
            .fold((0u64, 0u64), |(c, f), n| (c + u64::from(n), f + 1));
        (chunks > 0).then(|| format!("{chunks} chunks of {files} files have no live holder"))
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
