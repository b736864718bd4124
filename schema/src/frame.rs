//! Framing: every message is a `u32` big-endian length followed by that many bytes of CBOR.
//! Chunk payloads travel raw, right after the frame that announces their length.
//!
//! The length is checked against a per-connection maximum before anything is allocated, and a
//! frame must decode to exactly one value with no bytes left over. The body's buffer grows
//! as its bytes arrive, in steps of at most [`READ_STEP`], never to the announced length up
//! front: a peer that announces a large frame and sends nothing costs next to no memory.
//! Until a connection's hello is accepted its maximum is [`MAX_HELLO_FRAME`]. [`decode_frame`] is the
//! pure parser (used by the fuzz targets and unit tests); [`FrameReader`] and [`FrameWriter`]
//! run it over any tokio stream.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Largest frame on the control and tracker channels (fits a manifest of
/// [`crate::MAX_CHUNKS`] hashes plus headroom).
pub const MAX_FRAME: usize = 9 << 20;

/// Largest answer `p2pctl` reads from its own daemon: a whole `list` of the network can be
/// larger than [`MAX_FRAME`] (the daemon fetches it from the tracker in pages). The daemon is
/// local and trusted, and buffers grow only with the bytes received.
pub const MAX_CTL_ANSWER: usize = 64 << 20;

/// Largest frame a peer may send on the peer channel: requests and chunk headers are small.
pub const MAX_PEER_FRAME: usize = 64 << 10;

/// Largest first frame (the hello, or a bare `Stats` request) before the hello is accepted:
/// a hello is tiny, so an unauthenticated connection cannot make us hold much.
pub const MAX_HELLO_FRAME: usize = 8 << 10;

/// Most bytes a frame's buffer grows by per read.
pub const READ_STEP: usize = 64 << 10;

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the message in a frame")]
    Trailing(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// Was the connection simply closed or reset by the other side?
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Truncated => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Appends one frame holding `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    ciborium::into_writer(msg, &mut *out).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = u32::try_from(out.len() - start - LEN_PREFIX)
        .map_err(|_| FrameError::Encode("message larger than 4 GiB".into()))?;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes one CBOR value that must fill `body` exactly.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let mut rest = body;
    let value =
        ciborium::from_reader(&mut rest).map_err(|e| FrameError::Decode(short_error(&e)))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(value)
}

fn short_error<E: std::fmt::Debug>(e: &ciborium::de::Error<E>) -> String {
    match e {
        ciborium::de::Error::Io(io) => format!("i/o: {io:?}"),
        ciborium::de::Error::Syntax(at) => format!("CBOR syntax error at byte {at}"),
        ciborium::de::Error::Semantic(_, msg) => msg.clone(),
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
    }
}

/// Parses the first frame in `buf`. `Ok(None)` means more bytes are needed; otherwise returns
/// the message and how many bytes of `buf` it used.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, LEN_PREFIX + len)))
}

/// Reads frames (and raw payloads) from one side of a connection.
///
/// Not cancellation safe: a `recv` dropped half-way leaves the stream mid-frame, so run each
/// reader in its own task rather than in a `select!` branch.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames over `max` bytes.
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(64 << 10, inner),
            buf: Vec::new(),
            max,
        }
    }

    /// The next message, or `None` if the other side closed the connection between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut prefix = [0u8; LEN_PREFIX];
        let first = self.inner.read(&mut prefix).await?;
        if first == 0 {
            return Ok(None);
        }
        self.read_exact_or_truncated(&mut prefix[first..]).await?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let mut body = std::mem::take(&mut self.buf);
        body.clear();
        let read = self.read_body(&mut body, len).await;
        let decoded = read.and_then(|()| decode_body(&body));
        // Keep a modest buffer for the next frame; give large ones back.
        if body.capacity() <= 256 << 10 {
            self.buf = body;
        }
        decoded.map(Some)
    }

    /// Reads a frame body of `len` bytes into `body`, growing it only as bytes arrive.
    async fn read_body(&mut self, body: &mut Vec<u8>, len: usize) -> Result<(), FrameError> {
        while body.len() < len {
            let left = len - body.len();
            if body.capacity() == body.len() {
                // Full: grow by a step (or by doubling, which ever Vec picks), no more.
                body.reserve(left.min(READ_STEP));
            }
            let room = (body.capacity() - body.len()).min(left);
            let n = (&mut self.inner).take(room as u64).read_buf(body).await?;
            if n == 0 {
                return Err(FrameError::Truncated);
            }
        }
        Ok(())
    }

    /// Waits until bytes can be read (`true`) or the other side closed the connection
    /// (`false`). Cancellation safe, unlike [`Self::recv`]: nothing is consumed, so it can
    /// wait in a `select!` beside other events, and the frame is then read with `recv`.
    pub async fn ready(&mut self) -> Result<bool, FrameError> {
        use tokio::io::AsyncBufReadExt;
        Ok(!self.inner.fill_buf().await?.is_empty())
    }

    /// Changes the largest frame accepted from now on (raised once the hello is accepted).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Like [`Self::recv`], but a closed connection is an error too.
    pub async fn expect<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.recv().await?.ok_or(FrameError::Truncated)
    }

    /// Reads exactly `out.len()` raw payload bytes.
    pub async fn recv_payload(&mut self, out: &mut [u8]) -> Result<(), FrameError> {
        self.read_exact_or_truncated(out).await
    }

    /// Reads exactly `out.len()` raw payload bytes, handing each piece to `each` as soon as
    /// it is in (at most `piece` bytes at a time), while it is still in the CPU's cache: the
    /// caller can hash the payload as it arrives instead of in a second pass.
    pub async fn recv_payload_each(
        &mut self,
        out: &mut [u8],
        piece: usize,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), FrameError> {
        let mut filled = 0;
        while filled < out.len() {
            let end = (filled + piece.max(1)).min(out.len());
            let n = self.inner.read(&mut out[filled..end]).await?;
            if n == 0 {
                return Err(FrameError::Truncated);
            }
            each(&out[filled..filled + n]);
            filled += n;
        }
        Ok(())
    }

    async fn read_exact_or_truncated(&mut self, out: &mut [u8]) -> Result<(), FrameError> {
        match self.inner.read_exact(out).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Err(e) => Err(e.into()),
        }
    }

    /// Are bytes of a next frame already buffered? (A server answering pipelined requests
    /// can then hold its flush until it has answered them all.)
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }
}

/// Writes frames (and raw payloads) to one side of a connection. Messages are buffered;
/// [`Self::send`] flushes, [`Self::feed`] does not (to pipeline several requests).
pub struct FrameWriter<W> {
    inner: BufWriter<W>,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(64 << 10, inner),
            buf: Vec::new(),
        }
    }

    /// Queues `msg` without flushing.
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.buf.clear();
        encode_frame(msg, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        Ok(())
    }

    /// Queues raw bytes (a payload sent in pieces) without flushing.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.inner.write_all(bytes).await?;
        Ok(())
    }

    /// Sends `msg` and flushes.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Sends the header `msg` followed by the raw `payload`, and flushes.
    pub async fn send_with_payload<T: Serialize>(
        &mut self,
        msg: &T,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        self.feed(msg).await?;
        // Large payloads bypass the buffer (BufWriter writes them straight through).
        self.inner.write_all(payload).await?;
        self.flush().await
    }

    /// Flushes what was fed.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// The underlying stream, for writing around the buffer (flush first).
    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }

    /// Flushes and shuts the write side down.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping { n: u32 },
        Blob(#[serde(with = "serde_bytes")] Vec<u8>),
    }

    fn frame(msg: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(msg, &mut out).unwrap();
        out
    }

    #[test]
    fn round_trip() {
        let m = Msg::Ping { n: 7 };
        let f = frame(&m);
        let (back, used) = decode_frame::<Msg>(&f, MAX_FRAME).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, f.len());
    }

    #[test]
    fn every_truncated_prefix_is_incomplete() {
        let f = frame(&Msg::Blob(vec![9; 300]));
        for cut in 0..f.len() {
            assert!(
                decode_frame::<Msg>(&f[..cut], MAX_FRAME).unwrap().is_none(),
                "prefix of {cut} bytes"
            );
        }
    }

    #[test]
    fn oversized_is_rejected_before_reading_the_body() {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_frame::<Msg>(&f, MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        let f = frame(&Msg::Blob(vec![0; 100]));
        assert!(matches!(
            decode_frame::<Msg>(&f, 50),
            Err(FrameError::TooLarge { len, max: 50 }) if len > 100
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        let mut f = vec![0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_frame::<Msg>(&f, MAX_FRAME),
            Err(FrameError::Decode(_))
        ));
        // A valid value followed by an extra byte inside the frame.
        let mut body = Vec::new();
        ciborium::into_writer(&Msg::Ping { n: 1 }, &mut body).unwrap();
        body.push(0);
        f.clear();
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&body);
        assert!(matches!(
            decode_frame::<Msg>(&f, MAX_FRAME),
            Err(FrameError::Trailing(1))
        ));
        // Well-formed CBOR of the wrong shape.
        let mut f = Vec::new();
        encode_frame(&"hello", &mut f).unwrap();
        assert!(matches!(
            decode_frame::<Msg>(&f, MAX_FRAME),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn bytes_are_a_byte_string() {
        let f = frame(&Msg::Blob(vec![1; 1000]));
        // Roughly 1000 bytes plus small headers, not 1000 CBOR integers.
        assert!(f.len() < 1030, "{} bytes", f.len());
    }

    #[tokio::test]
    async fn reader_and_writer_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b, MAX_FRAME);
        let writer = tokio::spawn(async move {
            w.feed(&Msg::Ping { n: 1 }).await.unwrap();
            w.send_with_payload(&Msg::Ping { n: 2 }, &[7u8; 5000])
                .await
                .unwrap();
            w.shutdown().await.unwrap();
        });
        assert_eq!(r.recv::<Msg>().await.unwrap(), Some(Msg::Ping { n: 1 }));
        assert_eq!(r.recv::<Msg>().await.unwrap(), Some(Msg::Ping { n: 2 }));
        let mut payload = vec![0u8; 5000];
        r.recv_payload(&mut payload).await.unwrap();
        assert!(payload.iter().all(|&b| b == 7));
        assert_eq!(r.recv::<Msg>().await.unwrap(), None);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn memory_follows_the_bytes_that_arrive() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, MAX_FRAME);
        let body = {
            let mut f = Vec::new();
            encode_frame(&Msg::Blob(vec![5; 300_000]), &mut f).unwrap();
            f
        };
        // The length and a little of the body, then nothing for a while.
        a.write_all(&body[..LEN_PREFIX + 1000]).await.unwrap();
        let reading = tokio::spawn(async move {
            let got = r.recv::<Msg>().await;
            (got, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reading.is_finished());
        a.write_all(&body[LEN_PREFIX + 1000..]).await.unwrap();
        let (got, r) = reading.await.unwrap();
        assert_eq!(got.unwrap(), Some(Msg::Blob(vec![5; 300_000])));
        // Large frames' buffers are given back.
        assert_eq!(r.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn an_announced_length_is_not_allocated_before_its_bytes() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(b, MAX_FRAME);
        a.write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(&[1; 10]).await.unwrap();
        let mut body = Vec::new();
        let mut prefix = [0u8; LEN_PREFIX];
        r.read_exact_or_truncated(&mut prefix).await.unwrap();
        // Only what arrived is read; the buffer is one step at most, not 9 MiB.
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            r.read_body(&mut body, MAX_FRAME),
        )
        .await;
        assert!(read.is_err(), "still waiting for the rest");
        assert_eq!(body.len(), 10);
        assert!(body.capacity() <= READ_STEP, "{}", body.capacity());
    }

    #[tokio::test]
    async fn the_limit_can_be_raised_after_the_hello() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, MAX_HELLO_FRAME);
        let mut f = Vec::new();
        encode_frame(&Msg::Blob(vec![1; MAX_HELLO_FRAME]), &mut f).unwrap();
        a.write_all(&f).await.unwrap();
        assert!(matches!(
            r.recv::<Msg>().await,
            Err(FrameError::TooLarge {
                max: MAX_HELLO_FRAME,
                ..
            })
        ));
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, MAX_HELLO_FRAME);
        r.set_max(MAX_FRAME);
        a.write_all(&f).await.unwrap();
        assert!(r.recv::<Msg>().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn reader_reports_mid_frame_close_and_oversize() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(b, 16);
        a.write_all(&[0, 0, 0, 8, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(r.recv::<Msg>().await, Err(FrameError::Truncated)));

        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(b, 16);
        a.write_all(&[0, 0, 1, 0]).await.unwrap();
        assert!(matches!(
            r.recv::<Msg>().await,
            Err(FrameError::TooLarge { len: 256, max: 16 })
        ));
    }
}
