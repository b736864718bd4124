//! Reading a peer's answers: progress counting (silent and dripping peers time out) and
//! one chunk answer at a time.

use super::*;

/// Bytes read (and hashed) at a time while a chunk arrives: small enough to stay in cache.
const HASH_PIECE: usize = 256 << 10;

pub(super) type PeerReader = FrameReader<Counted<crate::link::LinkRead>>;
pub(super) type PeerWriter = FrameWriter<crate::link::LinkWrite>;

/// A reader that counts the bytes read through it, so a waiter can tell a slow peer that
/// keeps sending from a silent or dripping one (see [`stalled`]).
pub(super) struct Counted<R> {
    pub(super) inner: R,
    pub(super) read: Arc<AtomicU64>,
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
pub(super) async fn stalled(read: &AtomicU64, timeout: Duration) {
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

pub(super) enum Received {
    /// Chunk `index` is in the buffer; whether it matched its hash, if it was hashed as it
    /// arrived.
    Chunk(u32, Option<bool>),
    Refused(u32, p2p_schema::WireError),
    /// Not an answer: the peer pushed chunks it gained (see `PeerRequest::Watch`).
    Gained(FileId, Vec<u32>),
}

/// Reads the answer to the oldest request into `buf`.
pub(super) async fn receive(
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
        PeerResponse::Gained { file_id, indices } => Ok(Received::Gained(file_id, indices)),
        other => Err(Misbehaved(format!("unexpected answer {other:?}"))),
    }
}
