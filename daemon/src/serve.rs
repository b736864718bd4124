//! The peer server: other daemons connect, say hello, and ask for chunks. A chunk is served
//! only if this daemon holds it verified and durable; anything else gets an error reply.
//! A peer can never read any file that was not registered: requests name a file ID and a
//! chunk index, never a path.
//!
//! To spread a file through a swarm, a chunk just sent to one downloader is held back
//! (`Busy`) from the others while that one is still fetching from us: it will pass the chunk
//! on, and our uplink carries chunks nobody else has yet (see `LocalFile::may_send`).
//! The uplink goes to a few chunks at a time ([`UPLOAD_SLOTS`]); a request that waits too
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

mod packed;

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
/// A chunk sent to one peer is not sent to another while that is under way, nor for this
/// long after: the first passes it on, and this uplink carries chunks the swarm lacks (see
/// [`LocalFile::may_send`]). 3 s cut a 16 MiB crowd's seeder copies from 1.19 to 1.00 at the
/// same time, but at 64 MiB the crowd of 40 took 1.25x alone against 1.12x with 1 s.
///
/// [`LocalFile::may_send`]: crate::local::LocalFile::may_send
const SPREAD: Duration = Duration::from_secs(1);
/// A seeder's hold: [`SPREAD`], and in its first pass over a file 20 s (longer, but not for
/// ever: see [`LocalFile::may_send`]). With 5 s the seeder of a hundred leechers (`bench
/// --only fleet`) sent 178 of its 512 chunks a second time before its first pass was over, to
/// leechers that did not see the first recipient yet; the pass took 1.29x one leecher's
/// download alone. With 20 s it took 1.02x, and 10 chunks went out twice in it.
///
/// [`LocalFile::may_send`]: crate::local::LocalFile::may_send
const HOLD: crate::local::Hold = crate::local::Hold {
    spread: SPREAD,
    first_pass: Duration::from_secs(20),
};

/// Chunks sent at once, to all peers together (BitTorrent's unchoked peers): the uplink is
/// shared by a few transfers at a time, not split among every asker. In a flash crowd a new
/// chunk's first holder is asked for it by everyone at once: split among them all, every
/// copy arrives late and nobody can pass it on meanwhile. Four at a time, the first four have
/// it soon and serve it too. The crowd of a hundred (`bench --only fleet`, 5 Mbit/s uplinks)
/// used a twentieth of its uplinks for its first 30 s without slots (their `tbf` counters),
/// all of them within 10 s with slots.
const UPLOAD_SLOTS: usize = 4;
/// How long a chunk request waits for an upload slot before it is answered `Busy` (asked of
/// another holder then, which in a crowd soon there is).
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a send keeps its upload slot at most; past that it goes on without one.
const SLOT_HOLD: Duration = Duration::from_secs(5);

/// The peer server's own state: its upload limits, and who is fetching from it now.
pub struct Uploads {
    /// Bounds chunk reads in progress for uploads (memory), where `sendfile` is not used
    /// (not available, or the link is encrypted).
    slots: Semaphore,
    /// Chunk sends under way ([`UPLOAD_SLOTS`]).
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
            sending: Semaphore::new(UPLOAD_SLOTS),
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

/// A chunk asked for, and by whom.
struct Chunk {
    peer: PeerId,
    file_id: p2p_schema::FileId,
    index: u32,
}

/// The buffer a chunk is read into where `sendfile` is not available (unused where it is).
type SendBuf = Vec<u8>;

/// Answers a `GetChunk`: the chunk if it may be served now, else a refusal (not held, or
/// held back for the spread: `Busy`).
async fn send_chunk(
    node: &Node,
    uploads: &Uploads,
    writer: &mut Writer,
    chunk: Chunk,
    buf: &mut SendBuf,
) -> Result<(), String> {
    let Chunk {
        peer,
        file_id,
        index,
    } = chunk;
    let (local, offset, len) = match locate_chunk(node, &file_id, index) {
        Ok(found) => found,
        Err(e) => {
            return writer
                .send(&PeerResponse::Error(e))
                .await
                .map_err(|e| e.to_string())
        }
    };
    let fetching = |p: &PeerId| lock(&uploads.fetching).contains_key(p);
    let epoch = || uploads.epoch.load(std::sync::atomic::Ordering::Relaxed);
    let held = || format!("chunk {index} was just sent to another peer; ask it");
    // Held back: said at once, not after waiting for a slot.
    if local.holds_back(index, peer, HOLD, epoch(), fetching) {
        return busy(writer, held()).await;
    }
    let Ok(Ok(slot)) = tokio::time::timeout(SLOT_WAIT, uploads.sending.acquire()).await else {
        let why = format!("every upload slot is taken; ask another holder for chunk {index}");
        return busy(writer, why).await;
    };
    if !local.may_send(index, peer, HOLD, epoch(), fetching) {
        return busy(writer, held()).await;
    }
    let chunk = (&local, &file_id, index, offset, len);
    holding(slot, send_granted(node, uploads, writer, chunk, buf, peer)).await
}

/// Runs `send`, giving its upload slot up if it still runs after [`SLOT_HOLD`]: a slow
/// receiver, or one that does not read at all, never keeps a slot from others for long.
async fn holding<T>(
    slot: tokio::sync::SemaphorePermit<'_>,
    send: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(send);
    tokio::select! {
        done = &mut send => done,
        () = tokio::time::sleep(SLOT_HOLD) => {
            drop(slot);
            send.await
        }
    }
}

/// Sends a chunk allowed to go to `peer`.
async fn send_granted(
    node: &Node,
    uploads: &Uploads,
    writer: &mut Writer,
    (local, file_id, index, offset, len): (&Arc<LocalFile>, &p2p_schema::FileId, u32, u64, u32),
    buf: &mut SendBuf,
    peer: PeerId,
) -> Result<(), String> {
    let file_id = *file_id;
    if let Some(spans) = local.spans() {
        let chunk = (&file_id, index, offset, len);
        return packed::send_packed(node, uploads, writer, (local, spans), chunk, buf, peer).await;
    }
    // Opened (if it was closed) before anything is sent: a file that cannot be read is
    // refused, not cut short.
    let file = match local.handle() {
        Ok(file) => file,
        Err(e) => return refuse(writer, format!("chunk {index} cannot be read: {e}")).await,
    };
    let header = PeerResponse::Chunk { index, len };
    #[cfg(target_os = "linux")]
    if writer.get_ref().plain_socket().is_some() {
        writer.feed(&header).await.map_err(|e| e.to_string())?;
        writer.flush().await.map_err(|e| e.to_string())?;
        let Some(socket) = writer.get_ref().plain_socket() else {
            return Err("the link changed under a chunk".into());
        };
        // Paced in pieces under an upload limit, so a slow uplink still sends steadily (the
        // asker times out on silence, not on a slow chunk).
        let piece = if uploads.limit.is_limited() {
            PACE_PIECE
        } else {
            len
        };
        let mut sent = 0;
        while sent < len {
            let n = piece.min(len - sent);
            uploads.limit.spend(u64::from(n)).await;
            crate::fileio::send_file(socket, &file, offset + u64::from(sent), n)
                .await
                .map_err(|e| format!("sending chunk {index}: {e}"))?;
            sent += n;
        }
    } else {
        send_read(uploads, writer, (&file, offset, len), &header, buf).await?;
    }
    #[cfg(not(target_os = "linux"))]
    send_read(uploads, writer, (&file, offset, len), &header, buf).await?;
    sent(node, &local, (&file_id, index, len), peer);
    Ok(())
}

/// Counts a chunk sent.
fn sent(
    node: &Node,
    local: &LocalFile,
    (id, index, len): (&p2p_schema::FileId, u32, u32),
    peer: PeerId,
) {
    local.add_uploaded(u64::from(len));
    node.metrics.sent(id, u64::from(len));
    // The spread counts from when the peer has the whole chunk.
    local.sent(index, peer);
}

/// Answers a chunk request with `Busy`, for `why`: asked again later, or of another holder.
async fn busy(writer: &mut Writer, why: String) -> Result<(), String> {
    let e = WireError::new(ErrorCode::Busy, why);
    writer
        .send(&PeerResponse::Error(e))
        .await
        .map_err(|e| e.to_string())
}

/// Answers a chunk request with "not found", for `why`.
async fn refuse(writer: &mut Writer, why: String) -> Result<(), String> {
    let e = WireError::new(ErrorCode::NotFound, why);
    writer
        .send(&PeerResponse::Error(e))
        .await
        .map_err(|e| e.to_string())
}

/// Sends a chunk read into memory first: where `sendfile` is not available, or the link is
/// encrypted. Paced in pieces under an upload limit, like `sendfile`.
async fn send_read(
    uploads: &Uploads,
    writer: &mut Writer,
    (file, offset, len): (&Arc<std::fs::File>, u64, u32),
    header: &PeerResponse,
    buf: &mut SendBuf,
) -> Result<(), String> {
    *buf = read_chunk(uploads, file.clone(), offset, len, std::mem::take(buf)).await?;
    send_buf(uploads, writer, header, buf).await
}

/// Sends a chunk read into `buf`, paced like `sendfile`.
async fn send_buf(
    uploads: &Uploads,
    writer: &mut Writer,
    header: &PeerResponse,
    buf: &[u8],
) -> Result<(), String> {
    writer.feed(header).await.map_err(|e| e.to_string())?;
    // Pieces of one encrypted record each (a piece of 64 KiB would make a second, tiny one).
    for piece in buf.chunks(p2p_schema::secure::MAX_RECORD_PLAINTEXT) {
        uploads.limit.spend(piece.len() as u64).await;
        writer.write_raw(piece).await.map_err(|e| e.to_string())?;
    }
    writer.flush().await.map_err(|e| e.to_string())
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

/// Finds chunk `index` of file `id` if it may be served: registered, held, and (for a whole
/// file) unchanged since it was hashed. A changed file stops being served and the tracker is
/// told to forget it.
fn locate_chunk(
    node: &Node,
    id: &p2p_schema::FileId,
    index: u32,
) -> Result<(Arc<crate::local::LocalFile>, u64, u32), WireError> {
    let local = node.local_file(id).ok_or_else(|| not_shared(id))?;
    let (offset, len) = local.manifest.chunk_range(index).ok_or_else(|| {
        WireError::new(
            ErrorCode::BadRequest,
            format!("chunk index {index} is out of range"),
        )
    })?;
    if !local.has(index) {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("chunk {index} is not held here"),
        ));
    }
    // A `stat`: cheap enough to do inline, and it must come before every send.
    if let Err(why) = local.check_source() {
        node.tracker
            .notify(p2p_schema::TrackerRequest::Drop { file_id: *id });
        return Err(WireError::new(ErrorCode::NotFound, why));
    }
    Ok((local, offset, len))
}

/// Reads a chunk into `buf` on a blocking thread (where `sendfile` is not available).
async fn read_chunk(
    uploads: &Uploads,
    file: Arc<std::fs::File>,
    offset: u64,
    len: u32,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, String> {
    // Bound the memory held by reads in progress across all connections.
    let _permit = uploads.slots.acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        buf.resize(len as usize, 0);
        crate::fileio::read_exact_at(&file, &mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("reading a chunk to serve: {e}"))
}

/// Bytes sent at a time by `sendfile` under an upload limit.
#[cfg(target_os = "linux")]
const PACE_PIECE: u32 = 64 << 10;
