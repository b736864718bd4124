//! Answering a chunk request: the hold-back policy, the upload slots, and the send itself
//! (`sendfile` on a plain link, read and written through the encrypting stream on a secure
//! one; paced by `--upload-rate` either way).

use std::sync::Arc;
use std::time::Duration;

use p2p_schema::{ErrorCode, PeerId, PeerResponse, WireError};

use super::{not_shared, packed, Uploads, Writer};
use crate::local::LocalFile;
use crate::lock;
use crate::node::Node;

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
pub(super) const UPLOAD_SLOTS: usize = 4;
/// How long a chunk request waits for an upload slot before it is answered `Busy` (asked of
/// another holder then, which in a crowd soon there is).
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a send keeps its upload slot at most; past that it goes on without one.
const SLOT_HOLD: Duration = Duration::from_secs(5);

/// A chunk asked for, and by whom.
pub(super) struct Chunk {
    pub(super) peer: PeerId,
    pub(super) file_id: p2p_schema::FileId,
    pub(super) index: u32,
}

/// The buffer a chunk is read into where `sendfile` is not available (unused where it is).
pub(super) type SendBuf = Vec<u8>;

/// Answers a `GetChunk`: the chunk if it may be served now, else a refusal (not held; or
/// `Busy`: held back for the spread, or no upload slot free within [`SLOT_WAIT`]).
pub(super) async fn send_chunk(
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
        Err(e) => return reply_error(writer, e).await,
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
    sent(node, local, (&file_id, index, len), peer);
    Ok(())
}

/// Counts a chunk sent.
pub(super) fn sent(
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
    reply_error(writer, WireError::new(ErrorCode::Busy, why)).await
}

/// Answers a chunk request with "not found", for `why`.
pub(super) async fn refuse(writer: &mut Writer, why: String) -> Result<(), String> {
    reply_error(writer, WireError::new(ErrorCode::NotFound, why)).await
}

async fn reply_error(writer: &mut Writer, e: WireError) -> Result<(), String> {
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
pub(super) async fn send_buf(
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
