//! The download engine.
//!
//! A [`Download`] is driven by one coordinator task ([`run`]) that asks the tracker who holds
//! what, starts one worker per holder, and waits for the file to be complete. Each worker
//! keeps a window of `GetChunk` requests in flight on its connection, picking chunks through
//! the shared [`Picker`] (rarest first, random tie-break; in the end game a chunk still in
//! flight elsewhere may be asked of a second peer). Every chunk is checked against its
//! SHA-256 before it is written in place into the partial file; a bad chunk is discarded and
//! fetched again, and a peer that sends bad data twice is banned for the rest of the download.
//!
//! Written chunks go to the committer task ([`commit_loop`]), which makes them durable in
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
    PeerId, PeerRequest, PeerResponse, TrackerRequest, TrackerResponse, MAX_PEER_FRAME,
    PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::local::{Identity, LocalFile};
use crate::lock;
use crate::node::Node;
use crate::serve::write_all_at;
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
/// fault; a refusal for "busy, ask later" counts as a quarter.
const MAX_REFUSALS: u32 = 8;
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
/// Most peers one download fetches from at once.
const MAX_WORKERS: usize = 32;
/// The request window holds about this much of a peer's measured rate.
const WINDOW_LATENCY: Duration = Duration::from_millis(50);
/// How often a running download asks the tracker for holders.
const RELOCATE_INTERVAL: Duration = Duration::from_millis(500);
/// How often a worker whose peer has nothing we need asks it again what it holds.
const HAVE_POLL_INTERVAL: Duration = Duration::from_millis(100);
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
    /// Set to stop this download alone (pause, cancel).
    halt: watch::Sender<bool>,
    /// The partial file opened for direct I/O (`O_DIRECT`), where the file system allows:
    /// aligned chunks are written through it, bypassing the page cache.
    direct: Option<Arc<std::fs::File>>,
    /// The download's one task, while it has one. Held across starting and stopping, so a
    /// download never has two tasks (a resume waits for a pause still stopping the old one).
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the download cannot go on for now, while it cannot (see [`Event::Stalled`]).
    blocked: Mutex<Option<String>>,
    /// Wakes a stalled download to try again at once (`resume`).
    retry: Notify,
}

/// Fires when the daemon stops or the download is halted on its own.
pub struct Halt {
    daemon: watch::Receiver<bool>,
    download: watch::Receiver<bool>,
}

impl Halt {
    /// Has either fired?
    pub fn is_set(&self) -> bool {
        *self.daemon.borrow() || *self.download.borrow()
    }

    /// Resolves once either fires (at once if one has). Cancellation safe.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.daemon.wait_for(|s| *s) => {}
            _ = self.download.wait_for(|s| *s) => {}
        }
    }
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
            direct: open_direct(&part).map(Arc::new),
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
            halt: watch::channel(false).0,
            task: tokio::sync::Mutex::new(None),
            blocked: Mutex::new(None),
            retry: Notify::new(),
        }
    }

    /// What stops this download's tasks.
    pub fn halt(&self, node: &Node) -> Halt {
        Halt {
            daemon: node.stop_signal(),
            download: self.halt.subscribe(),
        }
    }

    /// Starts the download's task, in state `running`, unless it has one running already.
    /// Returns whether it started one.
    pub async fn start(self: &Arc<Self>, node: &Arc<Node>) -> bool {
        let mut task = self.task.lock().await;
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let _ = self.halt.send_replace(false);
        self.set_state(node, DownloadState::Running);
        *task = Some(tokio::spawn(run(node.clone(), self.clone())));
        true
    }

    /// Sets the state to `state`, stops the download's task and waits until it has ended
    /// (every worker joined, every chunk write returned, what was written committed).
    pub async fn stop(&self, node: &Node, state: DownloadState) {
        let mut task = self.task.lock().await;
        self.set_state(node, state);
        let _ = self.halt.send_replace(true);
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
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_state(&self, node: &Node, state: DownloadState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        let record = DownloadRecord {
            manifest: (*self.manifest).clone(),
            output: self.output.to_string_lossy().into_owned(),
            part: self.part.to_string_lossy().into_owned(),
            state,
            refetched: self.refetched,
        };
        if let Err(e) = node.store.put_download(&self.id, &record) {
            warn!(error = %e, "saving download state");
        }
    }

    /// A snapshot for `p2pctl status`.
    pub fn status(&self) -> p2p_schema::DownloadStatus {
        let window = Duration::from_secs(5);
        let (rate, peers) = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
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
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((Instant::now(), bytes, from));
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from);
    }
}

/// Which chunks are done, in flight and how rare: shared by a download's workers.
struct Picker {
    /// Verified and written (maybe not yet durable).
    done: Bitfield,
    in_flight: Vec<u8>,
    /// How many connected peers hold each chunk.
    availability: Vec<u16>,
    remaining: u32,
}

impl Picker {
    fn new(have: Bitfield) -> Picker {
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
    fn pick(&mut self, has: &Bitfield, mine: impl Fn(u32) -> bool) -> Option<u32> {
        let n = self.done.len();
        if n == 0 || self.remaining == 0 {
            return None;
        }
        let start = fastrand::u32(..n);
        let mut best: Option<(u16, u32)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if self.done.get(i) || !has.get(i) || self.in_flight[i as usize] > 0 {
                continue;
            }
            let a = self.availability[i as usize];
            if best.is_none_or(|(b, _)| a < b) {
                best = Some((a, i));
                if a <= 1 {
                    break;
                }
            }
        }
        let chosen = best.map(|(_, i)| i).or_else(|| {
            (0..n).map(|k| (start + k) % n).find(|&i| {
                !self.done.get(i) && has.get(i) && self.in_flight[i as usize] < 2 && !mine(i)
            })
        })?;
        self.in_flight[chosen as usize] += 1;
        Some(chosen)
    }

    /// A request for chunk `i` ended without it.
    fn release(&mut self, i: u32) {
        if let Some(c) = self.in_flight.get_mut(i as usize) {
            *c = c.saturating_sub(1);
        }
    }

    /// Chunk `i` arrived verified. Returns whether it was new.
    fn finish(&mut self, i: u32) -> bool {
        self.release(i);
        let new = self.done.set(i);
        if new {
            self.remaining -= 1;
        }
        new
    }

    fn add_availability(&mut self, has: &Bitfield, delta: i32) {
        for i in has.iter() {
            if let Some(a) = self.availability.get_mut(i as usize) {
                *a = (i32::from(*a) + delta).clamp(0, i32::from(u16::MAX)) as u16;
            }
        }
    }
}

/// State shared by a download's coordinator, workers and committer.
struct Swarm {
    node: Arc<Node>,
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
    finished: watch::Sender<bool>,
    /// The workers: joined before the committer is closed and before the file is finished.
    tasks: TaskTracker,
}

impl Swarm {
    fn picker(&self) -> std::sync::MutexGuard<'_, Picker> {
        self.picker.lock().unwrap_or_else(|p| p.into_inner())
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

/// Drives `dl` until it is complete, fails, or the daemon stops. A download stalled by a
/// write error (a full disk, a read-only or failing file system) says why, waits until it
/// can go on (space freed, `resume`, or a retry for other errors), and goes on.
async fn run(node: Arc<Node>, dl: Arc<Download>) {
    let span = tracing::info_span!("download", file = %dl.id.short(), name = %dl.manifest.name);
    async move {
        loop {
            match drive(node.clone(), dl.clone()).await {
                Ok(Driven::Complete) => {}
                Ok(Driven::Stopped) => info!(state = ?dl.state(), "download stopped"),
                Ok(Driven::Stalled(e)) => {
                    let why = stall_reason(&dl, &e);
                    warn!("download stalled: {why}");
                    *lock(&dl.blocked) = Some(why.clone());
                    let _ = dl.events.send(Event::Stalled(why));
                    let went_on = wait_to_go_on(&node, &dl, &e).await;
                    *lock(&dl.blocked) = None;
                    if went_on {
                        info!("download goes on after a stall");
                        continue;
                    }
                    info!(state = ?dl.state(), "download stopped");
                }
                Err(why) => {
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

/// Bytes of `dl` not held yet.
fn missing_bytes(dl: &Download) -> u64 {
    let have = dl.local.have();
    (0..dl.manifest.chunk_count())
        .filter(|&i| !have.get(i))
        .filter_map(|i| dl.manifest.chunk_range(i))
        .map(|(_, len)| u64::from(len))
        .sum()
}

/// The line `status` and an attached `p2pctl download` show for a stall.
fn stall_reason(dl: &Download, e: &WriteError) -> String {
    if e.is_full() {
        let missing = missing_bytes(dl);
        let free = available_space(&e.dir).unwrap_or(0);
        format!(
            "no space left on device at {} (needs {} more); free space or 'p2pctl resume'",
            e.dir.display(),
            p2p_schema::human_bytes(missing.saturating_sub(free).max(1))
        )
    } else {
        format!(
            "{e}; retrying every {}s, or 'p2pctl resume'",
            STALL_RETRY.as_secs()
        )
    }
}

/// How often a download stalled by a write error other than a full disk tries again.
const STALL_RETRY: Duration = Duration::from_secs(10);

/// Waits until a stalled download may go on: space freed for what it still needs (a full
/// disk), [`STALL_RETRY`] passed (other errors), or `resume`. Returns false if it was
/// stopped meanwhile.
async fn wait_to_go_on(node: &Node, dl: &Download, e: &WriteError) -> bool {
    let mut stop = dl.halt(node);
    let started = Instant::now();
    loop {
        tokio::select! {
            () = stop.wait() => return false,
            () = dl.retry.notified() => return true,
            () = tokio::time::sleep(STALL_RECHECK) => {}
        }
        let ready = if e.is_full() {
            // Enough for what is missing, or at least a good stretch of it.
            let wanted = missing_bytes(dl).min(64 << 20);
            available_space(&e.dir).is_some_and(|free| free >= wanted)
        } else {
            started.elapsed() >= STALL_RETRY
        };
        if ready {
            return true;
        }
    }
}

/// Bytes available to us on the file system holding `dir`, where the platform tells.
fn available_space(dir: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path and a buffer of the right type, both live across it.
        let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if r != 0 {
            return None;
        }
        // SAFETY: statvfs succeeded, so it filled the buffer.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

async fn drive(node: Arc<Node>, dl: Arc<Download>) -> Result<Driven, String> {
    let mut stop = dl.halt(&node);
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
        finished: watch::channel(false).0,
        tasks: TaskTracker::new(),
    });
    info!(
        have = dl.local.have_count(),
        chunks = dl.manifest.chunk_count(),
        "download started"
    );
    let close = CancellationToken::new();
    let mut committer = tokio::spawn(commit_loop(swarm.clone(), commit_rx, close.clone()));
    let ended = coordinate(&node, &dl, &swarm, &mut stop, &committer).await;
    // Whatever ended it, no worker and no chunk write of this download outlives it: stop and
    // join them all, then let the committer make durable what they wrote, and end.
    let _ = swarm.finished.send_replace(true);
    swarm.tasks.close();
    swarm.tasks.wait().await;
    close.cancel();
    let committed = (&mut committer).await.unwrap_or(false);
    match ended {
        Ended::Complete => {}
        Ended::Stopped => return Ok(Driven::Stopped),
        Ended::CommitFailed => return Err(commit_failure(&dl)),
        Ended::WriteFailed => {
            let e = lock(&swarm.write_error).take();
            return Ok(Driven::Stalled(e.unwrap_or_else(|| WriteError {
                dir: dl.part.parent().map(PathBuf::from).unwrap_or_default(),
                kind: std::io::ErrorKind::Other,
                message: commit_failure(&dl),
            })));
        }
    }
    if !committed || !dl.local.is_complete() {
        return Err(commit_failure(&dl));
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
    WriteFailed,
}

/// Finds holders and starts workers until every chunk is durable, the download is stopped,
/// or the committer fails.
async fn coordinate(
    node: &Arc<Node>,
    dl: &Arc<Download>,
    swarm: &Arc<Swarm>,
    stop: &mut Halt,
    committer: &tokio::task::JoinHandle<bool>,
) -> Ended {
    let mut backoff = Duration::from_millis(200);
    while !dl.local.is_complete() {
        if stop.is_set() {
            return Ended::Stopped;
        }
        if committer.is_finished() {
            return Ended::CommitFailed;
        }
        if lock(&swarm.write_error).is_some() {
            return Ended::WriteFailed;
        }
        if swarm.picker().remaining == 0 {
            // Every chunk is in; the committer is making the last ones durable.
            tokio::select! {
                () = stop.wait() => {}
                () = swarm.progress.notified() => {}
                () = tokio::time::sleep(COMMIT_INTERVAL) => {}
            }
            continue;
        }
        // Ask again soon: other downloaders become holders within a commit interval, and the
        // sooner we know them the sooner they share the load.
        let mut wait = RELOCATE_INTERVAL;
        match node
            .tracker
            .call(TrackerRequest::Locate {
                file_id: dl.id,
                max: 64,
            })
            .await
        {
            Ok(TrackerResponse::Holders { holders, .. }) => {
                backoff = Duration::from_millis(200);
                dl.stalled
                    .store(count_stalled(swarm, &holders), Ordering::Relaxed);
                for holder in holders {
                    start_worker(swarm, holder);
                }
            }
            Ok(other) => debug!(?other, "unexpected answer to locate"),
            Err(e) => {
                debug!(error = %e, "cannot locate holders; retrying");
                wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = stop.wait() => {}
            () = swarm.progress.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    Ended::Complete
}

fn commit_failure(dl: &Download) -> String {
    format!("cannot write {}: see the daemon log", dl.part.display())
}

/// Chunks still missing that none of `holders` (nor a connected worker) has.
fn count_stalled(swarm: &Swarm, holders: &[Holder]) -> u32 {
    let me = swarm.node.peer_id;
    let picker = swarm.picker();
    (0..picker.done.len())
        .filter(|&i| !picker.done.get(i))
        .filter(|&i| picker.availability[i as usize] == 0)
        .filter(|&i| !holders.iter().any(|h| h.peer_id != me && h.chunks.get(i)))
        .count() as u32
}

fn start_worker(swarm: &Arc<Swarm>, holder: Holder) {
    if holder.peer_id == swarm.node.peer_id {
        return;
    }
    if !lock(&swarm.peers).may_try(&holder.peer_id) {
        return;
    }
    let Some(chunks) = holder
        .chunks
        .clone()
        .checked(swarm.dl.manifest.chunk_count())
    else {
        return;
    };
    {
        let mut workers = lock(&swarm.workers);
        if workers.contains(&holder.peer_id) {
            lock(&swarm.fresh).insert(holder.peer_id, chunks);
            return;
        }
        if workers.len() >= MAX_WORKERS {
            return;
        }
        workers.insert(holder.peer_id);
    }
    let tasks = swarm.tasks.clone();
    let swarm = swarm.clone();
    let span = tracing::debug_span!("peer", addr = %holder.addr);
    tasks.spawn(
        async move {
            let peer = holder.peer_id;
            let mut worker = Worker {
                swarm: swarm.clone(),
                addr: holder.addr,
                peer,
                has: Bitfield::new(0),
                asked: VecDeque::new(),
                verifying: VecDeque::new(),
                pool: Vec::new(),
                received: 0,
                since: Instant::now(),
                delivered: 0,
                refusals: 0,
            };
            let mut stop = swarm.dl.halt(&swarm.node);
            let mut finished = swarm.finished.subscribe();
            // Cut short wherever it waits once the download ends: only the chunk writes it
            // started must be waited for, and `drain` does that.
            let result = tokio::select! {
                r = worker.run(chunks) => r,
                () = stop.wait() => Ok(()),
                _ = finished.wait_for(|f| *f) => Ok(()),
            };
            // Chunks still being verified are taken in before the worker lets go of them.
            let drained = worker.drain().await;
            let result = result.and(drained);
            let delivered = worker.delivered;
            drop(worker);
            let verdict = lock(&swarm.peers).session_ended(peer, delivered, result.as_ref().err());
            match (&result, verdict) {
                (Err(WorkerError::Write(e)), _) => {
                    lock(&swarm.write_error).get_or_insert_with(|| e.clone());
                }
                (Err(e), Verdict::SetAside) => {
                    warn!(peer = %holder.addr, "peer set aside from this download for {SET_ASIDE:?}: {e} ({MAX_FAULTS} faults in a row)");
                }
                (Err(e), Verdict::Banned) => {
                    warn!(peer = %holder.addr, "peer banned from this download: {e}");
                }
                (Err(e), Verdict::Retry(wait)) => {
                    info!("stopped fetching from this peer: {e}; trying it again in {wait:?}");
                }
                (Ok(()), _) => {}
            }
            lock(&swarm.workers).remove(&peer);
            lock(&swarm.fresh).remove(&peer);
            swarm.progress.notify_one();
        }
        .instrument(span),
    );
}

/// Fetches chunks from one peer.
struct Worker {
    swarm: Arc<Swarm>,
    addr: SocketAddr,
    peer: PeerId,
    /// What the peer holds, as counted in the picker's availability.
    has: Bitfield,
    /// Chunks requested and not yet answered, oldest first.
    asked: VecDeque<u32>,
    /// Chunks received and being verified and written, oldest first.
    verifying: VecDeque<(u32, Verifying)>,
    /// Spare chunk buffers.
    pool: Vec<AlignedBuf>,
    /// Bytes received from this peer since `since`: its rate sizes the request window.
    received: u64,
    since: Instant,
    /// Verified chunks this session delivered.
    delivered: u32,
    /// Refusals since the last chunk delivered, in quarters (see [`MAX_REFUSALS`]).
    refusals: u32,
}

/// A chunk being verified and written: its index, buffer, and whether it matched.
type Verifying = tokio::task::JoinHandle<(u32, AlignedBuf, std::io::Result<bool>)>;

/// Bytes a download may have in verification and writing at once, across its workers (each
/// worker may have at least [`MIN_VERIFYING`] chunks): a lone peer's stream keeps going while
/// several chunks wait on the disk.
const VERIFYING_PER_DOWNLOAD: usize = 8 << 20;
const MIN_VERIFYING: usize = 2;
/// Bytes read (and hashed) at a time while a chunk arrives: small enough to stay in cache.
const HASH_PIECE: usize = 256 << 10;

impl Drop for Worker {
    fn drop(&mut self) {
        let mut picker = self.swarm.picker();
        for &i in &self.asked {
            picker.release(i);
        }
        picker.add_availability(&self.has, -1);
        drop(picker);
        if !self.asked.is_empty() {
            self.swarm.changed.notify_waiters();
        }
    }
}

type PeerReader = FrameReader<Counted<tokio::net::tcp::OwnedReadHalf>>;
type PeerWriter = FrameWriter<tokio::net::tcp::OwnedWriteHalf>;

impl Worker {
    fn set_has(&mut self, has: Bitfield) {
        let mut picker = self.swarm.picker();
        picker.add_availability(&self.has, -1);
        picker.add_availability(&has, 1);
        self.has = has;
    }

    async fn run(&mut self, chunks: Bitfield) -> Result<(), WorkerError> {
        use WorkerError::{Misbehaved, Unreachable};
        let timeout = self.swarm.node.config.request_timeout;
        let mut stop = self.swarm.dl.halt(&self.swarm.node);
        let mut finished = self.swarm.finished.subscribe();
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .map_err(|_| Unreachable("connect timed out".into()))?
            .map_err(|e| Unreachable(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: r,
            read: read.clone(),
        };
        let mut reader: PeerReader = FrameReader::new(counted, MAX_PEER_FRAME);
        let mut writer: PeerWriter = FrameWriter::new(w);
        writer
            .send(&PeerRequest::Hello {
                version: PROTOCOL_VERSION,
                peer_id: self.swarm.node.peer_id,
                agent: p2p_schema::agent("p2pd"),
            })
            .await
            .map_err(net)?;
        match tokio::time::timeout(timeout, reader.expect::<PeerResponse>()).await {
            Ok(Ok(PeerResponse::Welcome { peer_id, .. })) if peer_id == self.peer => {}
            Ok(Ok(PeerResponse::Welcome { .. })) => {
                return Err(Misbehaved("a different peer answered".into()))
            }
            Ok(Ok(other)) => return Err(Misbehaved(format!("unexpected hello answer {other:?}"))),
            Ok(Err(e)) => return Err(net(e)),
            Err(_) => return Err(Misbehaved("no welcome in time".into())),
        }
        self.set_has(chunks);
        debug!("connected");

        let file_id = self.swarm.dl.id;
        let mut buf = AlignedBuf::new();
        loop {
            if stop.is_set() {
                return Ok(());
            }
            let fresh = lock(&self.swarm.fresh).remove(&self.peer);
            if let Some(fresh) = fresh {
                // Chunks only ever arrive at a peer: take in what we did not know of.
                let mut has = self.has.clone();
                for i in fresh.iter() {
                    has.set(i);
                }
                self.set_has(has);
            }
            // Keep the window full.
            let mut fed = false;
            let window = self.window();
            while self.asked.len() < window {
                let mine = |i| self.asked.contains(&i) || self.verifying.iter().any(|v| v.0 == i);
                let Some(i) = self.swarm.picker().pick(&self.has, mine) else {
                    break;
                };
                self.asked.push_back(i);
                writer
                    .feed(&PeerRequest::GetChunk { file_id, index: i })
                    .await
                    .map_err(net)?;
                fed = true;
            }
            if fed {
                writer.flush().await.map_err(net)?;
            }

            if self.asked.is_empty() && !self.verifying.is_empty() {
                // Nothing on the wire: take in what is being verified before deciding more.
                self.drain().await?;
                continue;
            }
            if self.asked.is_empty() {
                if self.swarm.picker().remaining == 0 {
                    return Ok(());
                }
                // Nothing this peer has is needed now: wait for a change, then ask it what
                // it holds (it may be downloading too).
                tokio::select! {
                    () = stop.wait() => return Ok(()),
                    _ = finished.wait_for(|f| *f) => return Ok(()),
                    () = self.swarm.changed.notified() => {}
                    () = tokio::time::sleep(HAVE_POLL_INTERVAL) => {}
                }
                writer
                    .send(&PeerRequest::GetHave { file_id })
                    .await
                    .map_err(net)?;
                match tokio::time::timeout(timeout, reader.expect::<PeerResponse>()).await {
                    Ok(Ok(PeerResponse::Have { chunks })) => {
                        let n = self.swarm.dl.manifest.chunk_count();
                        let chunks = chunks
                            .checked(n)
                            .ok_or_else(|| Misbehaved("malformed have".into()))?;
                        self.set_has(chunks);
                    }
                    Ok(Ok(PeerResponse::Error(e))) => return Err(Misbehaved(format!("peer: {e}"))),
                    Ok(Ok(other)) => {
                        return Err(Misbehaved(format!("unexpected answer {other:?}")))
                    }
                    Ok(Err(e)) => return Err(net(e)),
                    Err(_) => return Err(Misbehaved("no answer in time".into())),
                }
                continue;
            }

            let hash_inline = self.hash_inline();
            // Timed out on lack of progress, not on the whole chunk: a slow peer that keeps
            // sending is waited for, a silent or dripping one is not.
            let received = tokio::select! {
                () = stop.wait() => return Ok(()),
                _ = finished.wait_for(|f| *f) => return Ok(()),
                () = stalled(&read, timeout) => Err(Misbehaved(format!("less than {} KiB in {timeout:?}", MIN_PROGRESS >> 10))),
                r = receive(&mut reader, &self.swarm.dl.manifest, &mut self.asked, &mut buf, hash_inline) => r,
            };
            match received? {
                Received::Refused(index, e) => {
                    debug!(index, "peer refused a chunk: {e}");
                    self.swarm.picker().release(index);
                    let mut has = self.has.clone();
                    has.unset(index);
                    self.set_has(has);
                    self.swarm.changed.notify_waiters();
                    self.refusals += if e.code == ErrorCode::Busy { 1 } else { 4 };
                    if self.refusals >= MAX_REFUSALS * 4 {
                        return Err(Misbehaved(format!(
                            "it refused chunk after chunk it announced (last: {e})"
                        )));
                    }
                }
                Received::Chunk(index, matched) => {
                    self.received += buf.len() as u64;
                    // Write on a blocking thread while the next chunk arrives.
                    let data = std::mem::replace(&mut buf, self.pool.pop().unwrap_or_default());
                    let write = self.start_write(index, data, matched)?;
                    self.verifying.push_back((index, write));
                    let most = self.max_verifying();
                    while self
                        .verifying
                        .front()
                        .is_some_and(|(_, h)| h.is_finished() || self.verifying.len() > most)
                    {
                        self.finish_one().await?;
                    }
                }
            }
        }
    }

    /// Requests to keep in flight: enough for about [`WINDOW_LATENCY`] of this peer's rate
    /// (a slow or busy peer gets a shallow queue, so every asker gets its first chunks soon),
    /// at least 2 and at most the download's window; 4 until the rate is known.
    fn window(&self) -> usize {
        let elapsed = self.since.elapsed().as_secs_f64();
        if self.received == 0 || elapsed < 0.05 {
            return self.swarm.window.min(4);
        }
        let rate = self.received as f64 / elapsed;
        let chunk = f64::from(self.swarm.dl.manifest.chunk_size.max(1));
        let wanted = (rate * WINDOW_LATENCY.as_secs_f64() / chunk).ceil() as usize;
        wanted.clamp(2, self.swarm.window.max(2))
    }

    /// Waits for every chunk still being verified and takes in the outcomes: all of them,
    /// even after one fails, so that no write of this worker is still running when it ends.
    /// Returns the first failure.
    async fn drain(&mut self) -> Result<(), WorkerError> {
        let mut result = Ok(());
        while !self.verifying.is_empty() {
            let one = self.finish_one().await;
            result = result.and(one);
        }
        result
    }

    /// Waits for the oldest chunk being verified and takes in the outcome. Cancellation
    /// safe: the write stays queued (and is waited for by [`Worker::drain`]) until it has
    /// returned.
    async fn finish_one(&mut self) -> Result<(), WorkerError> {
        let Some((_, handle)) = self.verifying.front_mut() else {
            return Ok(());
        };
        let joined = handle.await;
        self.verifying.pop_front();
        let (index, data, outcome) = joined.map_err(|e| WorkerError::Internal(e.to_string()))?;
        let data = self.accept(index, data, outcome)?;
        if self.pool.len() <= self.max_verifying() {
            self.pool.push(data);
        }
        Ok(())
    }

    /// Chunks this worker may have in verification and writing at once.
    fn max_verifying(&self) -> usize {
        let workers = lock(&self.swarm.workers).len().max(1);
        let chunk = self.swarm.dl.manifest.chunk_size.max(1) as usize;
        (VERIFYING_PER_DOWNLOAD / chunk / workers).max(MIN_VERIFYING)
    }

    /// Whether to hash chunks from this peer as they arrive, on this task. With other peers
    /// sending too, that saves a hand-off to another thread per chunk and a second pass over
    /// the data; from a lone peer it would leave the receiving and the hashing of the only
    /// stream on one core, so its chunks are hashed on blocking threads instead.
    fn hash_inline(&self) -> bool {
        lock(&self.swarm.workers).len() > 1
    }

    /// Starts checking chunk `index` (in `data`) against its hash, unless that was done as it
    /// arrived (`matched`), and writing it in place if it matches, on a blocking thread.
    fn start_write(
        &self,
        index: u32,
        data: AlignedBuf,
        matched: Option<bool>,
    ) -> Result<Verifying, WorkerError> {
        let dl = &self.swarm.dl;
        let out_of_range = || WorkerError::Internal(format!("chunk {index} is out of range"));
        let (offset, len) = dl.manifest.chunk_range(index).ok_or_else(out_of_range)?;
        let expected = *dl.manifest.hash(index).ok_or_else(out_of_range)?;
        let file = dl.local.handle();
        let aligned = offset.is_multiple_of(ALIGN as u64) && (len as usize).is_multiple_of(ALIGN);
        let direct = dl.direct.clone().filter(|_| aligned);
        let swarm = self.swarm.clone();
        Ok(tokio::task::spawn_blocking(move || {
            if !matched.unwrap_or_else(|| sha256(&data) == expected) {
                return (index, data, Ok(false));
            }
            if swarm.picker().done.get(index) {
                // An end-game duplicate of a chunk already in: not written again.
                return (index, data, Ok(true));
            }
            let written = match direct.map(|d| write_all_at(&d, &data, offset)) {
                Some(Ok(())) => Ok(()),
                // Buffered where direct I/O is not possible (or was refused).
                Some(Err(_)) | None => write_all_at(&file, &data, offset)
                    .inspect(|()| start_writeback(&file, offset, data.len())),
            };
            (index, data, written.map(|()| true))
        }))
    }

    /// Takes in the outcome of verifying chunk `index`: counts it, commits it, or discards
    /// it and strikes the peer. Returns the buffer for reuse.
    fn accept(
        &mut self,
        index: u32,
        data: AlignedBuf,
        outcome: std::io::Result<bool>,
    ) -> Result<AlignedBuf, WorkerError> {
        let swarm = &self.swarm;
        let dl = &swarm.dl;
        let len = data.len() as u64;
        match outcome {
            Ok(true) => {
                let (new, have) = {
                    let mut picker = swarm.picker();
                    let new = picker.finish(index);
                    (new, picker.done.len() - picker.remaining)
                };
                self.delivered += 1;
                self.refusals = 0;
                if new {
                    dl.record_chunk(self.addr, len);
                    let _ = swarm.commits.send(index);
                    let _ = dl.events.send(Event::Chunk {
                        index,
                        from: self.addr,
                        have,
                    });
                } else {
                    dl.wasted.fetch_add(len, Ordering::Relaxed);
                }
                Ok(data)
            }
            Ok(false) => {
                dl.wasted.fetch_add(len, Ordering::Relaxed);
                swarm.picker().release(index);
                swarm.changed.notify_waiters();
                let strikes = lock(&swarm.peers).strike(self.peer);
                warn!(index, strikes, "chunk failed verification; discarded");
                if strikes >= MAX_STRIKES {
                    return Err(WorkerError::BadData(strikes));
                }
                Ok(data)
            }
            Err(e) => {
                swarm.picker().release(index);
                Err(WorkerError::Write(WriteError::new(dl, index, &e)))
            }
        }
    }
}

/// Why a worker stopped fetching from its peer.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    /// The peer could not be reached, or the connection broke: tried again after a wait.
    #[error("{0}")]
    Unreachable(String),
    /// The peer broke the protocol, refused chunk after chunk, or stopped sending: a fault.
    #[error("{0}")]
    Misbehaved(String),
    /// It sent chunks that failed verification this many times: banned from this download.
    #[error("it sent bad data {0} times")]
    BadData(u32),
    /// A verified chunk could not be written here: the download stalls until it can.
    #[error("{0}")]
    Write(WriteError),
    /// A fault of ours (a task that panicked, a bookkeeping slip).
    #[error("{0}")]
    Internal(String),
}

/// A frame error on a peer connection: a closed connection is the network's doing, anything
/// else (a malformed or oversized frame) the peer's.
fn net(e: p2p_schema::FrameError) -> WorkerError {
    if e.is_disconnect() {
        WorkerError::Unreachable(e.to_string())
    } else {
        WorkerError::Misbehaved(e.to_string())
    }
}

/// A chunk write that failed, explained for `status` and an attached `p2pctl download`.
#[derive(Debug, Clone)]
pub struct WriteError {
    /// The directory of the partial file (where space or permission is missing).
    pub dir: PathBuf,
    pub kind: std::io::ErrorKind,
    pub message: String,
}

impl WriteError {
    fn new(dl: &Download, index: u32, e: &std::io::Error) -> WriteError {
        let dir = dl
            .part
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        WriteError {
            dir,
            kind: e.kind(),
            message: format!("writing chunk {index} to {}: {e}", dl.part.display()),
        }
    }

    /// Is the device full?
    fn is_full(&self) -> bool {
        self.kind == std::io::ErrorKind::StorageFull
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What became of a peer when its session ended.
enum Verdict {
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
struct PeerRecords {
    strikes: HashMap<PeerId, u32>,
    /// Sessions in a row that ended badly without a chunk, and faults among them.
    failures: HashMap<PeerId, (u32, u32)>,
    /// Left out until then (`None`: for good).
    out_until: HashMap<PeerId, Option<Instant>>,
}

impl PeerRecords {
    /// May a session with `peer` start now?
    fn may_try(&mut self, peer: &PeerId) -> bool {
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
    fn strike(&mut self, peer: PeerId) -> u32 {
        let n = self.strikes.entry(peer).or_insert(0);
        *n += 1;
        *n
    }

    /// A session with `peer` ended, having delivered `delivered` chunks, with `error` if it
    /// ended badly: decides when to try it again.
    fn session_ended(
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

    /// Forgets waits that are over; past the bound, the waits ending soonest too, then the
    /// oldest failure counts (bans for bad data are kept).
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
            let excess = self.out_until.len() - MAX_PEER_RECORDS;
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

/// A reader that counts the bytes read through it, so a waiter can tell a slow peer that
/// keeps sending from a silent or dripping one (see [`stalled`]).
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// Resolves once a whole `timeout` passes in which fewer than [`MIN_PROGRESS`] bytes were
/// read (as counted by `read`).
async fn stalled(read: &AtomicU64, timeout: Duration) {
    let mut seen = read.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(timeout).await;
        let now = read.load(Ordering::Relaxed);
        if now.saturating_sub(seen) < MIN_PROGRESS {
            return;
        }
        seen = now;
    }
}

enum Received {
    /// Chunk `index` is in the buffer; whether it matched its hash, if it was hashed as it
    /// arrived.
    Chunk(u32, Option<bool>),
    Refused(u32, p2p_schema::WireError),
}

/// Reads the answer to the oldest request into `buf`.
async fn receive(
    reader: &mut PeerReader,
    manifest: &Manifest,
    asked: &mut VecDeque<u32>,
    buf: &mut AlignedBuf,
    hash_inline: bool,
) -> Result<Received, WorkerError> {
    use WorkerError::Misbehaved;
    let expected = *asked
        .front()
        .ok_or_else(|| WorkerError::Internal("nothing asked".into()))?;
    match reader.expect::<PeerResponse>().await.map_err(net)? {
        PeerResponse::Chunk { index, len } => {
            let want = manifest.chunk_range(expected).map(|(_, len)| len);
            if index != expected || Some(len) != want {
                return Err(Misbehaved(format!(
                    "it answered chunk {index} ({len} bytes) for chunk {expected} ({} bytes)",
                    want.unwrap_or(0)
                )));
            }
            buf.resize(len as usize);
            if !hash_inline {
                reader.recv_payload(buf).await.map_err(net)?;
                asked.pop_front();
                return Ok(Received::Chunk(index, None));
            }
            // Hashed as it arrives, each piece while still in cache.
            let mut hasher = Sha256::new();
            reader
                .recv_payload_each(buf, HASH_PIECE, |piece| hasher.update(piece))
                .await
                .map_err(net)?;
            asked.pop_front();
            let matched = manifest
                .hash(index)
                .is_some_and(|h| *h == <[u8; 32]>::from(hasher.finalize()));
            Ok(Received::Chunk(index, Some(matched)))
        }
        PeerResponse::Error(e) => {
            asked.pop_front();
            Ok(Received::Refused(expected, e))
        }
        other => Err(Misbehaved(format!("unexpected answer {other:?}"))),
    }
}

/// Opens `part` for direct I/O, if the platform and file system allow it.
fn open_direct(part: &std::path::Path) -> Option<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(part)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = part;
        None
    }
}

/// Asks the kernel to start writing a freshly written range to disk now, without waiting, so
/// that the committer's `fdatasync` finds little left to do (streaming writes otherwise pile
/// up as dirty pages and are flushed all at once).
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint on a descriptor we own; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Makes written chunks durable in batches: sync the file, then record in sled, then serve
/// and announce. A chunk is never recorded before its bytes are on disk. Closed (`close`)
/// once every worker has ended: what was written so far is committed before the task ends.
/// Returns false if a commit failed.
async fn commit_loop(
    swarm: Arc<Swarm>,
    mut rx: mpsc::UnboundedReceiver<u32>,
    close: CancellationToken,
) -> bool {
    loop {
        let mut batch = Vec::new();
        let stopping = tokio::select! {
            first = rx.recv() => match first {
                Some(i) => {
                    batch.push(i);
                    false
                }
                None => return true,
            },
            () = close.cancelled() => true,
        };
        let deadline = tokio::time::Instant::now() + COMMIT_INTERVAL;
        let chunks = swarm.dl.manifest.chunk_count() as usize;
        // The last chunks are committed at once: the download is done when they are.
        while !stopping
            && batch.len() < 4096
            && swarm.dl.local.have_count() as usize + batch.len() < chunks
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(i)) => batch.push(i),
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(i) = rx.try_recv() {
            batch.push(i);
        }
        if !batch.is_empty() && commit(&swarm, batch).await.is_err() {
            return false;
        }
        if stopping {
            return true;
        }
    }
}

async fn commit(swarm: &Swarm, batch: Vec<u32>) -> Result<(), ()> {
    let (dl, node) = (&swarm.dl, &swarm.node);
    let file = dl.local.handle();
    // 1. The bytes reach the disk.
    let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
    if let Err(e) = synced.map_err(std::io::Error::other).and_then(|r| r) {
        warn!(error = %e, "syncing {}", dl.part.display());
        return Err(());
    }
    // 2. Only then are they recorded as held.
    if let Err(e) = node.store.record_chunks(&dl.id, &batch) {
        warn!(error = %e, "recording chunks");
        return Err(());
    }
    // 3. Only then are they served and announced.
    dl.local.add(&batch);
    node.tracker.notify(TrackerRequest::Gained {
        file_id: dl.id,
        indices: batch,
    });
    if dl.local.is_complete() {
        swarm.progress.notify_one();
    }
    Ok(())
}

/// Renames the complete file into place and turns it into a share.
async fn finish(node: &Arc<Node>, dl: &Arc<Download>) -> Result<(), String> {
    let (part, output) = (dl.part.clone(), dl.output.clone());
    let file = dl.local.handle();
    let meta = tokio::task::spawn_blocking(move || -> Result<std::fs::Metadata, String> {
        file.sync_all()
            .map_err(|e| format!("syncing {}: {e}", part.display()))?;
        crate::part::rename_no_replace(&part, &output).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} appeared while downloading; the data is kept at {}",
                    output.display(),
                    part.display()
                )
            } else {
                format!("renaming {} to {}: {e}", part.display(), output.display())
            }
        })?;
        if let Some(dir) = output.parent() {
            // Make the rename itself durable (best effort: not every platform can).
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        std::fs::metadata(&output).map_err(|e| format!("reading {}: {e}", output.display()))
    })
    .await
    .map_err(|e| e.to_string())??;
    // Every worker and chunk write of this download has ended (see `drive`): nothing of ours
    // touches the file from here, so this identity is the one it keeps.
    let identity = Identity::of(&meta);
    dl.local.set_path(dl.output.clone());
    dl.local.set_source(identity);
    let share = ShareRecord::new(
        (*dl.manifest).clone(),
        dl.output.to_string_lossy().into_owned(),
        identity,
    );
    node.store
        .put_share(&dl.id, &share)
        .map_err(|e| e.to_string())?;
    dl.set_state(node, DownloadState::Complete);
    node.store.clear_chunks(&dl.id).map_err(|e| e.to_string())?;
    if let Err(e) = node.store.flush().await {
        warn!(error = %e, "flushing state after a download");
    }
    node.tracker.notify(TrackerRequest::Register {
        manifest: (*dl.manifest).clone(),
    });
    let peers = lock(&dl.sources).len() as u32;
    info!(
        output = %dl.output.display(),
        peers,
        "{} has completed downloading.",
        dl.manifest.name
    );
    let _ = dl.events.send(Event::Completed { peers });
    Ok(())
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
        // Both in flight: end game hands out a second copy, but not to the same asker.
        let asked: VecDeque<u32> = [0, 1].into();
        assert_eq!(p.pick(&rare, |i| asked.contains(&i)), None);
        let second = p.pick(&rare, |_| false).unwrap();
        assert!(second == 0 || second == 1);
        assert!(p.finish(0));
        assert!(!p.finish(0), "a duplicate is not new");
        assert_eq!(p.remaining, 3);
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
