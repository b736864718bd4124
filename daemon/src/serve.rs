//! The peer server: other daemons connect, say hello, and ask for chunks. A chunk is served
//! only if this daemon holds it verified and durable; anything else gets an error reply.
//! A peer can never read any file that was not registered: requests name a file ID and a
//! chunk index, never a path.
//!
//! To spread a file through a swarm, a chunk just sent to one downloader is held back
//! (`Busy`) from the others while that one is still fetching from us: it will pass the chunk
//! on, and our uplink carries chunks nobody else has yet (see `LocalFile::may_send`).
//! The uplink goes to a few chunks at a time ([`chunk::UPLOAD_SLOTS`]); a request that waits too
//! long for a slot is answered `Busy` too, and asked of another holder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2p_schema::{
    Bitfield, ErrorCode, FrameReader, FrameWriter, PeerId, PeerRequest, PeerResponse, WireError,
    MAX_GAINED, MAX_HELLO_FRAME, MAX_PEER_FRAME, PROTOCOL_VERSION,
};
use p2p_service::accept::Throttle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::link::{self, Accepted, LinkRead, LinkWrite};
use crate::local::LocalFile;
use crate::lock;
use crate::metrics::{Direction, Metrics};
use crate::node::Node;
use crate::pace::Pace;

mod chunk;
mod packed;

use chunk::{send_chunk, Chunk, SendBuf};

/// Most peer connections served at once.
const MAX_CONNECTIONS: usize = 512;
/// Most connections from one IP address at once.
const MAX_PER_IP: usize = 64;
/// Requests one connection may send per second (sustained), and in a burst.
const REQUESTS_PER_SEC: f64 = 4000.0;
const REQUEST_BURST: f64 = 1000.0;
/// How long a new connection may take for its handshake, and then for its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The peer server's own state: its upload limits, and who is fetching from it now.
pub struct Uploads {
    /// Bounds chunk reads in progress for uploads (memory), where `sendfile` is not used
    /// (not available, or the link is encrypted).
    slots: Semaphore,
    /// Chunk sends under way ([`chunk::UPLOAD_SLOTS`]).
    sending: Semaphore,
    /// Bounds upload bandwidth, if configured.
    limit: Pace,
    /// Peers connected to our peer server now, with their connection counts.
    fetching: Mutex<HashMap<PeerId, u32>>,
    /// Bumped each time the last of them goes (see `LocalFile::may_send`).
    epoch: std::sync::atomic::AtomicU64,
    /// Refused connections are logged at most once a second.
    refusals: Throttle,
}

impl Uploads {
    pub fn new(config: &crate::Config) -> Uploads {
        Uploads {
            slots: Semaphore::new(config.max_uploads.max(1)),
            sending: Semaphore::new(chunk::UPLOAD_SLOTS),
            limit: Pace::new(config.upload_rate as f64, 0.0),
            fetching: Mutex::default(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            refusals: Throttle::new(Duration::from_secs(1)),
        }
    }
}

/// Accepts peer connections until `stop` becomes true.
pub async fn serve(
    node: Arc<Node>,
    uploads: Arc<Uploads>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let caps = p2p_service::caps::ConnectionCaps::new(MAX_CONNECTIONS, MAX_PER_IP);
    while let Some((stream, remote, slot)) =
        p2p_service::accept::next_admitted("peer", &listener, &caps, &stop).await
    {
        let (node, uploads) = (node.clone(), uploads.clone());
        let stop = stop.clone();
        tokio::spawn(
            async move {
                if let Err(e) = connection(node, &uploads, stream, stop).await {
                    debug!("peer connection ended: {e}");
                }
                drop(slot);
            }
            .instrument(tracing::debug_span!("serve", %remote)),
        );
    }
}

type Reader = FrameReader<LinkRead>;
type Writer = FrameWriter<LinkWrite>;

async fn connection(
    node: Arc<Node>,
    uploads: &Uploads,
    stream: TcpStream,
    stop: CancellationToken,
) -> Result<(), String> {
    let accepted = tokio::time::timeout(HELLO_TIMEOUT, link::accept(stream, &node.links))
        .await
        .map_err(|_| "no handshake in time".to_string())?;
    let (r, w, proven) = match accepted {
        Ok(Accepted::Link(r, w, proven)) => (r, w, proven),
        Ok(Accepted::Plain(r, w)) => return refuse_plain(r, w, uploads).await,
        Err(e) => {
            if let Some(skipped) = uploads.refusals.allow() {
                warn!(skipped, "refused a peer connection: {e}");
            }
            return Err(e.to_string());
        }
    };
    // Until the hello is accepted only a tiny frame is read (see `MAX_HELLO_FRAME`).
    let mut reader = FrameReader::new(r, MAX_HELLO_FRAME);
    let mut writer = FrameWriter::new(w);
    let Some(peer) = hello(&node, &mut reader, &mut writer, proven).await? else {
        return Ok(());
    };
    let _fetching = Fetching::new(uploads, peer);
    let _counted = node.metrics.connection(Direction::In);

    let mut buf = SendBuf::default();
    let budget = Pace::new(REQUESTS_PER_SEC, REQUEST_BURST);
    let mut watching: Option<Watching> = None;
    let mut idle = tokio::time::Instant::now() + IDLE_TIMEOUT;
    loop {
        // Waits for the next request, pushing what the watched file gains meanwhile.
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(idle) => return Err("idle".into()),
            () = gained(&mut watching) => {
                if let Some(w) = watching.as_mut() {
                    w.push(&mut writer, &node.metrics).await?;
                }
                continue;
            }
            ready = reader.ready() => match ready {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            },
        }
        // Throttle a peer that floods us with requests.
        budget.spend(1).await;
        let request = match tokio::time::timeout(IDLE_TIMEOUT, reader.recv::<PeerRequest>()).await {
            Err(_) => return Err("idle".into()),
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => {
                let reply =
                    PeerResponse::Error(WireError::new(ErrorCode::BadRequest, e.to_string()));
                let _ = writer.send(&reply).await;
                return Err(e.to_string());
            }
        };
        idle = tokio::time::Instant::now() + IDLE_TIMEOUT;
        let conn = Conn {
            node: &node,
            uploads,
            peer,
        };
        answer(conn, request, &mut writer, &mut watching, &mut buf).await?;
    }
}

/// One connection's fixed parts: the daemon, its upload limits, the peer.
struct Conn<'a> {
    node: &'a Node,
    uploads: &'a Uploads,
    peer: PeerId,
}

/// Answers one request (a `Watch` starts pushes: see [`Watching`]).
async fn answer(
    conn: Conn<'_>,
    request: PeerRequest,
    writer: &mut Writer,
    watching: &mut Option<Watching>,
    buf: &mut SendBuf,
) -> Result<(), String> {
    let Conn {
        node,
        uploads,
        peer,
    } = conn;
    let reply = match request {
        PeerRequest::GetChunk { file_id, index } => {
            let chunk = Chunk {
                peer,
                file_id,
                index,
            };
            return send_chunk(node, uploads, writer, chunk, buf).await;
        }
        PeerRequest::GetHave { file_id } => match node.local_file(&file_id) {
            Some(local) => PeerResponse::Have {
                chunks: local.have(),
            },
            None => PeerResponse::Error(not_shared(&file_id)),
        },
        PeerRequest::Watch { file_id } => match node.local_file(&file_id) {
            Some(local) => {
                let w = Watching::new(local);
                let chunks = w.told.clone();
                *watching = Some(w);
                PeerResponse::Have { chunks }
            }
            None => PeerResponse::Error(not_shared(&file_id)),
        },
        PeerRequest::Hello { .. } => {
            PeerResponse::Error(WireError::new(ErrorCode::BadRequest, "already said hello"))
        }
    };
    writer.send(&reply).await.map_err(|e| e.to_string())
}

/// The file a connection watches: what it was last told of it (see [`PeerRequest::Watch`]).
struct Watching {
    local: Arc<LocalFile>,
    changes: tokio::sync::watch::Receiver<u64>,
    told: Bitfield,
}

impl Watching {
    fn new(local: Arc<LocalFile>) -> Watching {
        let mut changes = local.watch();
        changes.mark_unchanged();
        Watching {
            told: local.have(),
            changes,
            local,
        }
    }

    /// Pushes the chunks gained since the peer was last told, in messages of at most
    /// [`MAX_GAINED`] indices.
    async fn push(&mut self, writer: &mut Writer, metrics: &Metrics) -> Result<(), String> {
        let now = self.local.have();
        let added = now.added_since(&self.told);
        self.told = now;
        for indices in added.chunks(MAX_GAINED) {
            let push = PeerResponse::Gained {
                file_id: self.local.id,
                indices: indices.to_vec(),
            };
            writer.feed(&push).await.map_err(|e| e.to_string())?;
            metrics.pushed(Direction::In);
        }
        writer.flush().await.map_err(|e| e.to_string())
    }
}

/// Resolves when the watched file has gained chunks (never, when nothing is watched).
async fn gained(watching: &mut Option<Watching>) {
    if let Some(w) = watching {
        if w.changes.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Takes the hello: the peer's ID if it speaks our version (then the frame limit opens up),
/// `None` if it left before saying anything.
async fn hello(
    node: &Node,
    reader: &mut Reader,
    writer: &mut Writer,
    proven: Option<PeerId>,
) -> Result<Option<PeerId>, String> {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<PeerRequest>())
        .await
        .map_err(|_| "no hello in time".to_string())?
        .map_err(|e| e.to_string())?;
    match hello {
        Some(PeerRequest::Hello { peer_id, .. }) if proven.is_some_and(|p| p != peer_id) => {
            let e = WireError::new(
                ErrorCode::BadRequest,
                "the hello's peer ID is not the session's",
            );
            let _ = writer.send(&PeerResponse::Error(e)).await;
            Err("a hello naming another peer".into())
        }
        Some(PeerRequest::Hello {
            version, peer_id, ..
        }) if version == PROTOCOL_VERSION => {
            let welcome = PeerResponse::Welcome {
                version: PROTOCOL_VERSION,
                peer_id: node.peer_id,
                pushes: true,
            };
            writer.send(&welcome).await.map_err(|e| e.to_string())?;
            reader.set_max(MAX_PEER_FRAME);
            Ok(Some(peer_id))
        }
        Some(PeerRequest::Hello { version, .. }) => {
            let e = WireError::new(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION}): upgrade p2pd"),
            );
            let _ = writer.send(&PeerResponse::Error(e)).await;
            Err("unsupported version".into())
        }
        Some(_) => {
            let e = WireError::new(ErrorCode::BadRequest, "the first message must be a hello");
            let _ = writer.send(&PeerResponse::Error(e)).await;
            Err("no hello".into())
        }
        None => Ok(None),
    }
}

/// A plain connection where links must be secure (a closed swarm, or `--encrypt`), or from a
/// daemon of an earlier version: answers its hello with an error in the plain framing, so it
/// says why, and closes. Nothing else is read or sent.
async fn refuse_plain(
    r: tokio::net::tcp::OwnedReadHalf,
    w: tokio::net::tcp::OwnedWriteHalf,
    uploads: &Uploads,
) -> Result<(), String> {
    let mut reader = FrameReader::new(r, MAX_HELLO_FRAME);
    let mut writer = FrameWriter::new(w);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<PeerRequest>()).await;
    let message = match hello {
        Ok(Ok(Some(PeerRequest::Hello { version, .. }))) if version != PROTOCOL_VERSION => format!(
            "protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION}, \
             with secure links): upgrade p2pd"
        ),
        _ => "this peer takes secure links only (a closed swarm, or --encrypt)".to_string(),
    };
    if let Some(skipped) = uploads.refusals.allow() {
        warn!(skipped, "refused a plain peer connection: {message}");
    }
    let e = WireError::new(ErrorCode::Unauthorized, message.clone());
    let _ = writer.send(&PeerResponse::Error(e)).await;
    Err(message)
}

/// Counts a peer in [`Uploads::fetching`] while one of its connections lasts.
struct Fetching<'a> {
    uploads: &'a Uploads,
    peer: PeerId,
}

impl<'a> Fetching<'a> {
    fn new(uploads: &'a Uploads, peer: PeerId) -> Self {
        *lock(&uploads.fetching).entry(peer).or_insert(0) += 1;
        Fetching { uploads, peer }
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut fetching = lock(&self.uploads.fetching);
        if let Some(n) = fetching.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                fetching.remove(&self.peer);
                if fetching.is_empty() {
                    // Idle: whoever fetches next starts a new pass over our files.
                    self.uploads
                        .epoch
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

fn not_shared(id: &p2p_schema::FileId) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("file {id} is not shared here"))
}
