//! The encrypted stream after the handshake: [`SecureRead`] and [`SecureWrite`], each
//! record `[u16 length][ciphertext]` under its own nonce, carrying the plain frames unchanged.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{MAX_MESSAGE, MAX_RECORD_PLAINTEXT, TAG};

/// The reading half of a secure stream: decrypts records as they arrive.
pub struct SecureRead<R> {
    inner: R,
    transport: Arc<StatelessTransportState>,
    /// The next record's nonce (the confirmation took 0).
    nonce: u64,
    /// Ciphertext read but not yet decrypted: `input[start..filled]`, as many records as one
    /// read brought (room for two whole ones).
    input: Vec<u8>,
    start: usize,
    filled: usize,
    /// Decrypted bytes not yet handed out: `plain[pos..end]`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
}

/// A record on the wire: two length bytes, then at most a Noise message.
const MAX_RECORD: usize = 2 + MAX_MESSAGE;

impl<R> SecureRead<R> {
    pub(super) fn new(inner: R, transport: Arc<StatelessTransportState>) -> Self {
        SecureRead {
            inner,
            transport,
            nonce: 1,
            input: vec![0; 2 * MAX_RECORD],
            start: 0,
            filled: 0,
            plain: vec![0; MAX_RECORD_PLAINTEXT],
            pos: 0,
            end: 0,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The length of the whole record at the front of the input, if it is all there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let have = &self.input[self.start..self.filled];
        if have.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([have[0], have[1]]));
        if len < TAG {
            return Err(bad_record());
        }
        Ok((have.len() >= 2 + len).then_some(2 + len))
    }

    /// Decrypts the record of `len` bytes at the front of the input into `out`.
    fn open(&mut self, len: usize, out: &mut [u8]) -> io::Result<usize> {
        let body = &self.input[self.start + 2..self.start + len];
        let n = self
            .transport
            .read_message(self.nonce, body, out)
            .map_err(|_| bad_record())?;
        self.nonce += 1;
        self.start += len;
        Ok(n)
    }
}

fn bad_record() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a record failed authentication")
}

impl<R: AsyncRead + Unpin> AsyncRead for SecureRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pos == this.end {
            if let Some(len) = this.whole_record()? {
                if buf.remaining() >= len - 2 - TAG {
                    // Room for all of it: decrypted straight into the caller's buffer.
                    let out = buf.initialize_unfilled_to(len - 2 - TAG);
                    let n = this.open(len, out)?;
                    buf.advance(n);
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                let mut plain = std::mem::take(&mut this.plain);
                let n = this.open(len, &mut plain);
                this.plain = plain;
                (this.pos, this.end) = (0, n?);
                continue;
            }
            // Not a whole record yet: make room at the back, then read what the socket has.
            if this.start > 0 {
                this.input.copy_within(this.start..this.filled, 0);
                this.filled -= this.start;
                this.start = 0;
            }
            let mut rb = ReadBuf::new(&mut this.input[this.filled..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let got = rb.filled().len();
            if got == 0 {
                if this.filled == 0 {
                    return Poll::Ready(Ok(())); // closed between records
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            this.filled += got;
        }
        let n = buf.remaining().min(this.end - this.pos);
        buf.put_slice(&this.plain[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// The writing half of a secure stream: each write becomes one record.
pub struct SecureWrite<W> {
    inner: W,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    /// A sealed record not yet fully written, from `pos`.
    out: Vec<u8>,
    pos: usize,
}

impl<W> SecureWrite<W> {
    pub(super) fn new(inner: W, transport: Arc<StatelessTransportState>) -> Self {
        SecureWrite {
            inner,
            transport,
            nonce: 1,
            out: Vec::with_capacity(2 + MAX_MESSAGE),
            pos: 0,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: AsyncWrite + Unpin> SecureWrite<W> {
    /// Writes out the sealed record, if any.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SecureWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_RECORD_PLAINTEXT);
        this.out.resize(2 + n + TAG, 0);
        let sealed = this
            .transport
            .write_message(this.nonce, &buf[..n], &mut this.out[2..])
            .map_err(io::Error::other)?;
        this.nonce += 1;
        this.out.truncate(2 + sealed);
        // `sealed` is at most 65,535: the Noise limit.
        let len = u16::try_from(sealed).map_err(io::Error::other)?;
        this.out[..2].copy_from_slice(&len.to_be_bytes());
        // Start sending at once; what is left goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
