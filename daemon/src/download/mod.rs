//! The download engine.
//!
//! A [`Download`] is driven by one coordinator task (`run`) that asks the tracker who holds
//! what, starts one worker per holder, and waits for the file to be complete. Each worker
//! keeps a window of `GetChunk` requests in flight on its connection, picking chunks through
//! the shared `Picker` in `picker.rs` (rarest first, random tie-break; in the end game a chunk
//! still in flight elsewhere may be asked of a second peer). Every chunk is checked against its
//! SHA-256 before it is written in place into the partial file; a bad chunk is discarded and
//! fetched again, and a peer that sends bad data twice is banned for the rest of the download.
//!
//! Written chunks go to the committer task (`commit::commit_loop`), which makes them durable in
//! batches: sync the partial file, *then* record the chunks in sled, *then* serve and announce
//! them. When the download ends, for whatever reason, every worker is stopped and joined, and
//! every chunk write it started has returned, before the committer is closed; only then is a
//! complete file synced, renamed to its final name, and its identity recorded as a share
//! (so nothing of ours writes to a file after it is recorded: see `daemon/STATE.md`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2p_schema::{
    sha256, Bitfield, DownloadState, ErrorCode, FileId, FrameReader, FrameWriter, Holder, Manifest,
    PeerId, PeerRequest, PeerResponse, TrackerRequest, MAX_PEER_FRAME, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

mod commit;
mod error;
mod peers;
mod picker;
mod stall;
mod wire;
mod worker;

use commit::{commit_loop, finish};
use error::{net, DownloadError, WorkerError, WriteError};
use peers::{PeerRecords, Verdict};
use picker::Picker;
use stall::{stall_reason, wait_to_go_on};
use wire::{receive, stalled, Counted, PeerReader, PeerWriter, Received};
use worker::start_worker;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::context::Context;
use crate::fileio::{available_space, open_direct, start_writeback, write_all_at};
use crate::local::{Identity, LocalFile};
use crate::lock;
use crate::store::{DownloadRecord, ShareRecord};

/// Bytes kept in flight per peer connection, at most (bounded further by the chunk count).
const WINDOW_BYTES: u64 = 8 << 20;
/// Bad chunks from one peer before it is banned from this download.
const MAX_STRIKES: u32 = 2;
/// Sessions in a row that end in a fault (wrong answers, refusal after refusal, no progress)
/// before a peer is set aside for [`SET_ASIDE`].
const MAX_FAULTS: u32 = 3;
/// How long a peer that keeps faulting is left out of a download.
const SET_ASIDE: Duration = Duration::from_secs(600);
/// Refusals in a row (a chunk it announced, then would not send) that end a session with a
/// fault. "Busy, ask later" (a seeder spreading its chunks, or every upload slot taken) is
/// not one: the chunk is asked of others, and of this peer again after [`BUSY_RETRY`].
const MAX_REFUSALS: u32 = 8;
/// How long a chunk a peer answered `Busy` for is not asked of that peer again.
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// First wait before trying a peer again after a session ends badly; doubled each time up to
/// [`MAX_RETRY_WAIT`].
const RETRY_WAIT: Duration = Duration::from_secs(2);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// Peers remembered per download (faults, waits, bans); beyond it, the expired go first.
const MAX_PEER_RECORDS: usize = 4096;
/// A peer must send at least this much in each `--request-timeout` while a chunk is awaited,
/// or it times out (silent or dripping).
const MIN_PROGRESS: u64 = 16 << 10;
/// How often a download stalled by a write error checks whether it can go on.
const STALL_RECHECK: Duration = Duration::from_secs(1);
/// Most peers one download fetches from at once: about as many as BitTorrent clients keep
/// connected. In a crowd, the more of the swarm each downloader watches, the sooner it finds
/// the peer that holds a chunk nobody else has yet (16 left late joiners unseen; see
/// `docs/performance.md`). Past it, idle peers give their slots up (`ROTATE_IDLE`).
const MAX_WORKERS: usize = 64;
/// A peer that has had nothing a download needs for this long gives its slot up when every
/// slot is taken (see `Worker::idle`).
const ROTATE_IDLE: Duration = Duration::from_secs(2);
/// The request window holds about this much of a peer's measured rate.
const WINDOW_LATENCY: Duration = Duration::from_millis(50);
/// How often a running download asks the tracker for holders while it learns of new ones;
/// each answer with no new holder doubles the wait, up to [`MAX_RELOCATE_INTERVAL`]. What
/// connected holders gain they push (see `PeerRequest::Watch`): the tracker is only where
/// new peers are found.
const RELOCATE_INTERVAL: Duration = Duration::from_millis(500);
const MAX_RELOCATE_INTERVAL: Duration = Duration::from_secs(4);
/// How often a worker whose peer has nothing we need asks it again what it holds, where the
/// peer does not push what it gains (a daemon from before pushes).
const HAVE_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often a worker idle on a peer that pushes asks it what it holds all the same: a
/// check that nothing was missed, and it keeps the connection from idling out.
const HAVE_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How often the committer makes written chunks durable, at most.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// What a download tells those following it.
#[derive(Debug, Clone)]
pub enum Event {
    /// Chunk `index` arrived from `from` and was verified; `have` chunks are now held.
    Chunk {
        index: u32,
        from: SocketAddr,
        have: u32,
    },
    /// The file is complete at its output path; chunks came from `peers` peers.
    Completed { peers: u32 },
    /// The download stopped for good.
    Failed(String),
    /// The download cannot go on for now (a chunk could not be written); it goes on by
    /// itself when it can, or on `resume`.
    Stalled(String),
}

/// One download, running or not.
pub struct Download {
    pub id: FileId,
    pub manifest: Arc<Manifest>,
    pub local: Arc<LocalFile>,
    pub output: PathBuf,
    pub part: PathBuf,
    state: Mutex<DownloadState>,
    /// Subscribe to follow progress.
    pub events: broadcast::Sender<Event>,
    downloaded: AtomicU64,
    wasted: AtomicU64,
    stalled: AtomicU32,
    resumed_with: u32,
    /// Bytes that had to be fetched again because a crash tore them, over the download's life.
    refetched: u64,
    recent: Mutex<VecDeque<(Instant, u64, SocketAddr)>>,
    sources: Mutex<HashSet<SocketAddr>>,
    /// The stop token of the download's current run: a child of the daemon's, cancelled to
    /// stop this download alone (pause, cancel).
    halt: Mutex<CancellationToken>,
    /// The partial file opened for direct I/O (`O_DIRECT`), where the file system allows:
    /// aligned chunks are written through it, bypassing the page cache.
    /// Closed once the download is complete.
    direct: Mutex<Option<Arc<std::fs::File>>>,
    /// The download's one task, while it has one. Held across starting and stopping, so a
    /// download never has two tasks (a resume waits for a pause still stopping the old one).
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the download cannot go on for now, while it cannot (see [`Event::Stalled`]).
    blocked: Mutex<Option<String>>,
    /// Wakes a stalled download to try again at once (`resume`).
    retry: Notify,
}

impl Download {
    /// A download record brought to life; `local` holds what is already verified, and
    /// `refetched` counts bytes crashes tore so far (persisted with the record).
    pub fn new(
        manifest: Arc<Manifest>,
        local: Arc<LocalFile>,
        output: PathBuf,
        part: PathBuf,
        state: DownloadState,
        refetched: u64,
    ) -> Download {
        Download {
            direct: Mutex::new(open_direct(&part).map(Arc::new)),
            resumed_with: local.have_count(),
            refetched,
            id: manifest.file_id(),
            manifest,
            local,
            output,
            part,
            state: Mutex::new(state),
            events: broadcast::channel(1024).0,
            downloaded: AtomicU64::new(0),
            wasted: AtomicU64::new(0),
            stalled: AtomicU32::new(0),
            recent: Mutex::new(VecDeque::new()),
            sources: Mutex::new(HashSet::new()),
            halt: Mutex::new(CancellationToken::new()),
            task: tokio::sync::Mutex::new(None),
            blocked: Mutex::new(None),
            retry: Notify::new(),
        }
    }

    /// Starts the download's task, in state `running`, unless it has one running already.
    /// Returns whether it started one.
    pub async fn start(self: &Arc<Self>, node: &Arc<Context>) -> bool {
        let mut task = self.task.lock().await;
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let stop = node.stop_token().child_token();
        *lock(&self.halt) = stop.clone();
        self.set_state(node, DownloadState::Running);
        *task = Some(tokio::spawn(run(node.clone(), self.clone(), stop)));
        true
    }

    /// Sets the state to `state`, stops the download's task and waits until it has ended
    /// (every worker joined, every chunk write returned, what was written committed).
    pub async fn stop(&self, node: &Context, state: DownloadState) {
        let mut task = self.task.lock().await;
        self.set_state(node, state);
        lock(&self.halt).cancel();
        if let Some(t) = task.take() {
            join_logged(t, &self.manifest.name).await;
        }
    }

    /// Waits until the download's task (if any) has ended; for shutdown, once the daemon's
    /// stop signal has fired.
    pub async fn join(&self) {
        if let Some(t) = self.task.lock().await.take() {
            join_logged(t, &self.manifest.name).await;
        }
    }

    /// Why the download cannot go on for now, if it cannot.
    pub fn blocked(&self) -> Option<String> {
        lock(&self.blocked).clone()
    }

    /// Wakes a stalled download to try again now. Returns whether it was stalled.
    pub fn retry_now(&self) -> bool {
        let stalled = self.blocked().is_some();
        if stalled {
            self.retry.notify_one();
        }
        stalled
    }

    /// The current state.
    pub fn state(&self) -> DownloadState {
        lock(&self.state).clone()
    }

    pub(crate) fn set_state(&self, node: &Context, state: DownloadState) {
        *lock(&self.state) = state.clone();
        let record = DownloadRecord {
            manifest: (*self.manifest).clone(),
            output: self.output.to_string_lossy().into_owned(),
            part: self.part.to_string_lossy().into_owned(),
            state,
            refetched: self.refetched,
            collection: self.local.collection(),
        };
        if let Err(e) = node.store.put_download(&self.id, &record) {
            warn!(error = %e, "saving download state");
        }
    }

    /// A snapshot for `p2pctl status`.
    pub fn status(&self) -> p2p_schema::DownloadStatus {
        let window = Duration::from_secs(5);
        let (rate, peers) = {
            let mut recent = lock(&self.recent);
            while recent.front().is_some_and(|(t, _, _)| t.elapsed() > window) {
                recent.pop_front();
            }
            let bytes: u64 = recent.iter().map(|(_, n, _)| n).sum();
            let peers: HashSet<_> = recent.iter().map(|(_, _, a)| a).collect();
            (bytes / window.as_secs(), peers.len() as u32)
        };
        p2p_schema::DownloadStatus {
            id: self.id,
            name: self.manifest.name.clone(),
            size: self.manifest.size,
            output: self.output.display().to_string(),
            state: self.state(),
            chunks: self.manifest.chunk_count(),
            have: self.local.have_count(),
            downloaded: self.downloaded.load(Ordering::Relaxed),
            wasted: self.wasted.load(Ordering::Relaxed),
            peers,
            rate,
            stalled: self.stalled.load(Ordering::Relaxed),
            blocked: self.blocked(),
            resumed_with: self.resumed_with,
            refetched: self.refetched,
        }
    }

    fn record_chunk(&self, from: SocketAddr, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
        lock(&self.recent).push_back((Instant::now(), bytes, from));
        lock(&self.sources).insert(from);
    }
}

/// State shared by a download's coordinator, workers and committer.
struct Swarm {
    node: Arc<Context>,
    dl: Arc<Download>,
    picker: Mutex<Picker>,
    /// Wakes idle workers when chunks are released or peers learn more.
    changed: Notify,
    /// Wakes the coordinator when the file is complete or a worker ends.
    progress: Notify,
    commits: mpsc::UnboundedSender<u32>,
    workers: Mutex<HashSet<PeerId>>,
    /// What this download remembers of peers that misbehaved or failed (bounded, pruned).
    peers: Mutex<PeerRecords>,
    /// Set by a worker that could not write a chunk: the download stalls until it can.
    write_error: Mutex<Option<WriteError>>,
    /// What the tracker last said a connected peer holds, for its worker to take in (a busy
    /// worker does not ask its peer, and a downloading peer gains chunks all the time).
    fresh: Mutex<HashMap<PeerId, Bitfield>>,
    window: usize,
    /// Set when the download ends (complete, stopped or failed): workers still waiting on
    /// slow peers give up.
    finished: CancellationToken,
    /// The workers: joined before the committer is closed and before the file is finished.
    tasks: TaskTracker,
}

impl Swarm {
    fn picker(&self) -> std::sync::MutexGuard<'_, Picker> {
        lock(&self.picker)
    }
}

/// Waits for a download's task, saying so in the log while it takes long (a chunk write
/// stuck on a slow disk).
async fn join_logged(mut task: tokio::task::JoinHandle<()>, name: &str) {
    let mut waited = Duration::ZERO;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(_) => return,
            Err(_) => {
                waited += Duration::from_secs(5);
                warn!(
                    name,
                    ?waited,
                    "waiting for a download's chunk writes to return"
                );
            }
        }
    }
}

/// Drives `dl` until it is complete, fails, or `stop` is cancelled (the daemon stops, or
/// the download is paused or cancelled). A download stalled by a write error (a full disk, a
/// read-only or failing file system) says why, waits until it can go on (space freed,
/// `resume`, or a retry for other errors), and goes on.
async fn run(node: Arc<Context>, dl: Arc<Download>, stop: CancellationToken) {
    let span = tracing::info_span!("download", file = %dl.id.short(), name = %dl.manifest.name);
    async move {
        loop {
            match drive(node.clone(), dl.clone(), &stop).await {
                Ok(Driven::Complete) => {}
                Ok(Driven::Stopped) => info!(state = ?dl.state(), "download stopped"),
                Ok(Driven::Stalled(e)) => {
                    let why = stall_reason(&dl, &e);
                    warn!("download stalled: {why}");
                    *lock(&dl.blocked) = Some(why.clone());
                    let _ = dl.events.send(Event::Stalled(why));
                    let went_on = wait_to_go_on(&dl, &e, &stop).await;
                    *lock(&dl.blocked) = None;
                    if went_on {
                        info!("download goes on after a stall");
                        continue;
                    }
                    info!(state = ?dl.state(), "download stopped");
                }
                Err(e) => {
                    let why = e.to_string();
                    warn!("download failed: {why}");
                    dl.set_state(&node, DownloadState::Failed(why.clone()));
                    let _ = dl.events.send(Event::Failed(why));
                }
            }
            return;
        }
    }
    .instrument(span)
    .await
}

/// How one drive of a download ended.
enum Driven {
    Complete,
    /// Paused, cancelled, or the daemon is stopping.
    Stopped,
    /// A chunk could not be written; every chunk verified before is kept.
    Stalled(WriteError),
}

async fn drive(
    node: Arc<Context>,
    dl: Arc<Download>,
    stop: &CancellationToken,
) -> Result<Driven, DownloadError> {
    let chunk_size = u64::from(dl.manifest.chunk_size.max(1));
    let window = (WINDOW_BYTES / chunk_size).clamp(2, node.config.max_in_flight.max(2) as u64);
    let (commit_tx, commit_rx) = mpsc::unbounded_channel();
    let swarm = Arc::new(Swarm {
        picker: Mutex::new(Picker::new(dl.local.have())),
        node: node.clone(),
        dl: dl.clone(),
        changed: Notify::new(),
        progress: Notify::new(),
        commits: commit_tx,
        workers: Mutex::default(),
        peers: Mutex::default(),
        write_error: Mutex::default(),
        fresh: Mutex::default(),
        window: window as usize,
        finished: stop.child_token(),
        tasks: TaskTracker::new(),
    });
    info!(
        have = dl.local.have_count(),
        chunks = dl.manifest.chunk_count(),
        "download started"
    );
    let close = CancellationToken::new();
    let mut committer = tokio::spawn(commit_loop(swarm.clone(), commit_rx, close.clone()));
    let ended = coordinate(&node, &dl, &swarm, stop, &committer).await;
    // Whatever ended it, no worker and no chunk write of this download outlives it: stop and
    // join them all, then let the committer make durable what they wrote, and end.
    swarm.finished.cancel();
    swarm.tasks.close();
    swarm.tasks.wait().await;
    close.cancel();
    let committed = (&mut committer).await.unwrap_or(false);
    match ended {
        Ended::Complete => {}
        Ended::Stopped => return Ok(Driven::Stopped),
        Ended::CommitFailed => return Err(DownloadError::Commit(dl.part.clone())),
        Ended::WriteFailed(e) => return Ok(Driven::Stalled(e)),
    }
    if !committed || !dl.local.is_complete() {
        return Err(DownloadError::Commit(dl.part.clone()));
    }
    finish(&node, &dl).await?;
    Ok(Driven::Complete)
}

/// How the coordinator's loop ended.
enum Ended {
    Complete,
    Stopped,
    CommitFailed,
    /// A worker could not write a chunk (see [`Swarm::write_error`]).
    WriteFailed(WriteError),
}

/// Finds holders and starts workers until every chunk is durable, the download is stopped,
/// or the committer fails.
async fn coordinate(
    node: &Arc<Context>,
    dl: &Arc<Download>,
    swarm: &Arc<Swarm>,
    stop: &CancellationToken,
    committer: &tokio::task::JoinHandle<bool>,
) -> Ended {
    let mut backoff = Duration::from_millis(200);
    let mut relocate = RELOCATE_INTERVAL;
    let mut known: HashSet<PeerId> = HashSet::new();
    while !dl.local.is_complete() {
        if stop.is_cancelled() {
            return Ended::Stopped;
        }
        if committer.is_finished() {
            return Ended::CommitFailed;
        }
        if let Some(e) = lock(&swarm.write_error).take() {
            return Ended::WriteFailed(e);
        }
        if swarm.picker().remaining == 0 {
            // Every chunk is in; the committer is making the last ones durable.
            tokio::select! {
                () = stop.cancelled() => {}
                () = swarm.progress.notified() => {}
                () = tokio::time::sleep(COMMIT_INTERVAL) => {}
            }
            continue;
        }
        // Ask again soon while new holders turn up: other downloaders become holders within
        // a commit interval, and the sooner we know them the sooner they share the load.
        let wait = match find_holders(node, swarm, &mut known).await {
            Ok(new) => {
                backoff = Duration::from_millis(200);
                relocate = if new {
                    RELOCATE_INTERVAL
                } else {
                    (relocate * 2).min(MAX_RELOCATE_INTERVAL)
                };
                relocate
            }
            Err(e) => {
                debug!(error = %e, "cannot locate holders; retrying");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                wait
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = swarm.progress.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    Ended::Complete
}

/// Asks the tracker for holders and starts a worker for each new one (and hands what the
/// tracker says to those running). Returns whether a holder not `known` before turned up.
async fn find_holders(
    node: &Context,
    swarm: &Arc<Swarm>,
    known: &mut HashSet<PeerId>,
) -> Result<bool, p2p_schema::WireError> {
    let holders = match swarm.dl.local.collection() {
        None => node.tracker.locate(swarm.dl.id, 64, true).await?.1,
        Some(cid) => holders_in_collection(node, swarm.dl.id, cid).await?,
    };
    swarm
        .dl
        .stalled
        .store(count_stalled(swarm, &holders), Ordering::Relaxed);
    if known.len() > MAX_PEER_RECORDS {
        known.clear();
    }
    let mut new = false;
    for holder in holders {
        new |= known.insert(holder.peer_id);
        start_worker(swarm, holder);
    }
    Ok(new)
}

/// Holders of file `id`, a member of collection `cid`: those the tracker knows for the file
/// itself (registered alone somewhere), and those of the collection, what they hold of the
/// file unknown until asked (a holder of the collection may not have the file yet).
async fn holders_in_collection(
    node: &Context,
    id: FileId,
    cid: FileId,
) -> Result<Vec<Holder>, p2p_schema::WireError> {
    // Both at once: one round trip, not two, before a small file's download can begin.
    let (own, of_collection) = tokio::join!(
        node.tracker.locate(id, 64, true),
        node.tracker.locate(cid, 64, true)
    );
    let mut holders = match own {
        Ok((_, holders)) => holders,
        Err(e) if e.code == p2p_schema::ErrorCode::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let (_, of_collection) = of_collection?;
    for mut h in of_collection {
        if !holders.iter().any(|known| known.peer_id == h.peer_id) {
            h.complete = false;
            h.chunks = p2p_schema::Bitfield::new(0);
            holders.push(h);
        }
    }
    Ok(holders)
}

/// Chunks still missing that none of `holders` (nor a connected worker) has.
/// None are counted while a holder whose chunks are unknown (a brief answer) is not yet
/// connected: it may hold any of them.
fn count_stalled(swarm: &Swarm, holders: &[Holder]) -> u32 {
    let me = swarm.node.peer_id;
    let n = swarm.dl.manifest.chunk_count();
    let others: Vec<&Holder> = holders.iter().filter(|h| h.peer_id != me).collect();
    let unknown = |h: &&Holder| !h.complete && h.chunks.len() != n;
    let workers = lock(&swarm.workers);
    if others
        .iter()
        .any(|h| unknown(h) && !workers.contains(&h.peer_id))
    {
        return 0;
    }
    drop(workers);
    let picker = swarm.picker();
    (0..picker.done.len())
        .filter(|&i| !picker.done.get(i))
        .filter(|&i| picker.availability[i as usize] == 0)
        .filter(|&i| !others.iter().any(|h| h.complete || h.chunks.get(i)))
        .count() as u32
}
