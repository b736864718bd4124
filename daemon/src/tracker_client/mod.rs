//! The daemon's session with the tracker: one TCP connection, kept open, reconnected with
//! backoff when it drops. Requests are pipelined: the tracker answers in order, so each
//! response goes to the oldest waiting caller.
//!
//! On every (re)connect the session says hello and re-announces everything this daemon holds
//! (from the `announce` callback), so a restarted tracker, or one that expired us, learns our
//! holdings again. While disconnected, calls fail at once with
//! [`ErrorCode::TrackerUnavailable`]; callers that must keep going (downloads) retry.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2p_schema::secure::{self, HandshakeError, Keypair, SecureRead, SecureWrite, SwarmKey};
use p2p_schema::{
    ErrorCode, FileId, FileSummary, FrameError, FrameReader, FrameWriter, Holder, ListCursor,
    Manifest, TrackerRequest, TrackerResponse, WireError, LIST_PAGE_MAX, MAX_FRAME,
    PROTOCOL_VERSION,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::lock;
use tracing::{debug, info, warn};

mod session;
mod set;

pub use set::{file_of, homes, Trackers, DEFAULT_REPLICAS};

use session::session_loop;

type Reply = oneshot::Sender<Result<TrackerResponse, WireError>>;

struct Call {
    request: TrackerRequest,
    reply: Option<Reply>,
}

/// Builds the requests that re-announce what this daemon holds, after each (re)connect.
pub type Announce = Arc<dyn Fn() -> Vec<TrackerRequest> + Send + Sync>;

/// Who we are to the tracker, and how we know it is the right one.
#[derive(Clone)]
pub struct Identity {
    /// Our key pair: the session proves we hold it, and our peer ID is derived from it.
    pub key: Arc<Keypair>,
    pub listen: SocketAddr,
    /// A closed swarm's key: the session proves we hold it too.
    pub swarm: Option<SwarmKey>,
    /// The tracker's key, if pinned.
    pub tracker_key: Option<[u8; 32]>,
}

/// A handle on the tracker session. Cheap to clone.
#[derive(Clone)]
pub struct TrackerClient {
    calls: mpsc::Sender<Call>,
    connected: watch::Receiver<bool>,
    address: String,
    /// The tracker answers `ListPage` (its welcome said so).
    list_pages: Arc<AtomicBool>,
    /// Why the last attempt to open the session failed, while it keeps failing.
    problem: Arc<Mutex<Option<String>>>,
    /// Counts the requests made.
    metrics: Arc<crate::metrics::Metrics>,
}

/// Most files a listing gathers over its pages: a tracker whose pages never end is an error.
const MAX_LISTED: usize = 1_000_000;

/// How long one request may wait for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

fn unavailable(address: &str, why: impl std::fmt::Display) -> WireError {
    WireError::new(
        ErrorCode::TrackerUnavailable,
        format!("tracker {address} is unavailable: {why}"),
    )
}

impl TrackerClient {
    /// Starts the session task. It first waits for `gate` (the daemon has loaded what it
    /// holds, so the first announcement is complete), then runs until `stop` becomes true,
    /// and says `Bye`.
    pub fn start(
        address: String,
        identity: Identity,
        announce: Announce,
        mut gate: watch::Receiver<bool>,
        metrics: Arc<crate::metrics::Metrics>,
        stop: CancellationToken,
    ) -> (TrackerClient, tokio::task::JoinHandle<()>) {
        let (calls_tx, calls_rx) = mpsc::channel(1024);
        let address_for_task = address.clone();
        let (connected_tx, connected_rx) = watch::channel(false);
        let list_pages = Arc::new(AtomicBool::new(false));
        let pages_for_task = list_pages.clone();
        let problem: Arc<Mutex<Option<String>>> = Arc::default();
        let problem_for_task = problem.clone();
        let task = tokio::spawn(async move {
            let early_stop = stop.clone();
            tokio::select! {
                _ = gate.wait_for(|loaded| *loaded) => {}
                () = early_stop.cancelled() => return,
            }
            session_loop(
                address_for_task,
                identity,
                announce,
                calls_rx,
                (connected_tx, pages_for_task, problem_for_task),
                stop,
            )
            .await
        });
        (
            TrackerClient {
                calls: calls_tx,
                connected: connected_rx,
                address,
                list_pages,
                problem,
                metrics,
            },
            task,
        )
    }

    /// The tracker's address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Is the session up right now?
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Why the session is down, if opening it keeps failing (`tracker refused us: ...`).
    pub fn problem(&self) -> Option<String> {
        lock(&self.problem).clone()
    }

    /// Registers `manifest`: this daemon holds the whole file.
    pub async fn register(&self, manifest: Manifest) -> Result<FileSummary, WireError> {
        let request = TrackerRequest::Register {
            manifest,
            member: false,
        };
        match self.call(request).await? {
            TrackerResponse::Registered { file } => Ok(file),
            other => Err(unexpected(other)),
        }
    }

    /// The files whose name is `query`, or whose ID is or starts with it.
    pub async fn find(&self, query: &str) -> Result<Vec<FileSummary>, WireError> {
        let query = query.to_string();
        match self.call(TrackerRequest::Find { query }).await? {
            TrackerResponse::Files { files } => Ok(files),
            other => Err(unexpected(other)),
        }
    }

    /// Every file on the network (fetched page by page from a tracker that pages).
    pub async fn list(&self) -> Result<Vec<FileSummary>, WireError> {
        match self.call(TrackerRequest::List).await? {
            TrackerResponse::Files { files } => Ok(files),
            other => Err(unexpected(other)),
        }
    }

    /// The manifest of file `id`, as the tracker has it (check it against `id`).
    pub async fn manifest(&self, id: FileId) -> Result<Manifest, WireError> {
        match self
            .call(TrackerRequest::GetManifest { file_id: id })
            .await?
        {
            TrackerResponse::Manifest { manifest } => Ok(manifest),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `max` holders of file `id`, with what each holds (with `brief`, only whether
    /// it holds everything).
    pub async fn locate(
        &self,
        id: FileId,
        max: u32,
        brief: bool,
    ) -> Result<(FileSummary, Vec<Holder>), WireError> {
        match self
            .call(TrackerRequest::Locate {
                file_id: id,
                max,
                brief,
            })
            .await?
        {
            TrackerResponse::Holders { file, holders } => Ok((file, holders)),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `request` and waits for its answer. An error reply becomes `Err`.
    ///
    /// `List` is answered as [`TrackerResponse::Files`] with every file: from a tracker that
    /// pages, fetched page by page (one answer holding them all could exceed the frame
    /// limit and end the session).
    pub async fn call(&self, request: TrackerRequest) -> Result<TrackerResponse, WireError> {
        if matches!(request, TrackerRequest::List) && self.list_pages.load(Ordering::Relaxed) {
            return self.list_all().await;
        }
        self.call_one(request).await
    }

    /// Every file on the network, one `ListPage` after another.
    async fn list_all(&self) -> Result<TrackerResponse, WireError> {
        let mut files = Vec::new();
        let mut after: Option<ListCursor> = None;
        loop {
            let request = TrackerRequest::ListPage {
                after: after.clone(),
                limit: LIST_PAGE_MAX,
            };
            let (page, next) = match self.call_one(request).await? {
                TrackerResponse::FilePage { files, next } => (files, next),
                other => return Err(self.malformed(format!("{other:?} answering a list page"))),
            };
            files.extend(page);
            let Some(next) = next else {
                return Ok(TrackerResponse::Files { files });
            };
            // Each page must start past the one before: a tracker that loops is an error.
            let advances = after
                .as_ref()
                .is_none_or(|a| (&next.name, &next.id) > (&a.name, &a.id));
            if !advances || files.len() > MAX_LISTED {
                return Err(self.malformed("a list whose pages do not end".to_string()));
            }
            after = Some(next);
        }
    }

    fn malformed(&self, what: String) -> WireError {
        warn!(tracker = %self.address, "the tracker sent a malformed answer: {what}");
        WireError::new(
            ErrorCode::Internal,
            format!(
                "the tracker {} sent a malformed answer: {what}",
                self.address
            ),
        )
    }

    /// One request, one answer.
    async fn call_one(&self, request: TrackerRequest) -> Result<TrackerResponse, WireError> {
        if !self.is_connected() {
            return Err(unavailable(&self.address, "not connected (retrying)"));
        }
        self.metrics.tracker_request(request.kind());
        let (tx, rx) = oneshot::channel();
        self.calls
            .send(Call {
                request,
                reply: Some(tx),
            })
            .await
            .map_err(|_| unavailable(&self.address, "daemon is shutting down"))?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(Ok(TrackerResponse::Error(e)))) => Err(e),
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unavailable(&self.address, "connection lost")),
            Err(_) => Err(unavailable(&self.address, "no answer in time")),
        }
    }

    /// Sends `request` without waiting for the answer (errors are logged). Dropped if the
    /// session is down: holdings are re-announced in full on reconnect anyway. Call it from
    /// within the runtime.
    pub fn notify(&self, request: TrackerRequest) {
        if !self.is_connected() {
            return;
        }
        self.metrics.tracker_request(request.kind());
        let call = Call {
            request,
            reply: None,
        };
        if let Err(mpsc::error::TrySendError::Full(call)) = self.calls.try_send(call) {
            // A burst: queue it behind the others rather than lose an announcement.
            let calls = self.calls.clone();
            tokio::spawn(async move {
                let _ = calls.send(call).await;
            });
        }
    }
}

/// An answer that does not fit the request: an error for its caller.
fn unexpected(answer: TrackerResponse) -> WireError {
    WireError::new(
        ErrorCode::Internal,
        format!("unexpected tracker answer {answer:?}"),
    )
}
