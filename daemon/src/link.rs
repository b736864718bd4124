//! A link: a connection between two daemons, plain (an open swarm) or secure (a closed
//! swarm, or `--encrypt`): the same frames either way, `sendfile` only on a plain one.
//!
//! Opening one is the only place the two kinds differ: [`open`] on the connecting side,
//! [`accept`] on the serving side (which also tells a daemon of an earlier protocol version
//! to upgrade, and refuses a plain connection where links must be secure).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use p2p_schema::secure::{self, HandshakeError, Keypair, SecureRead, SecureWrite, SwarmKey};
use p2p_schema::PeerId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The reading half of a link.
pub enum LinkRead {
    Plain(OwnedReadHalf),
    Secure(SecureRead<OwnedReadHalf>),
}

/// The writing half of a link.
pub enum LinkWrite {
    Plain(OwnedWriteHalf),
    Secure(SecureWrite<OwnedWriteHalf>),
}

/// How this daemon's links are opened.
#[derive(Clone)]
pub struct LinkPolicy {
    pub key: std::sync::Arc<Keypair>,
    /// A closed swarm's key: every link proves it.
    pub swarm: Option<SwarmKey>,
    /// Links are secure even in an open swarm.
    pub encrypt: bool,
}

impl LinkPolicy {
    /// Must links be secure?
    pub fn secure(&self) -> bool {
        self.swarm.is_some() || self.encrypt
    }
}

/// Why a link was not opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("a different peer answered ({0})")]
    WrongPeer(String),
    #[error("a plain connection where links must be secure")]
    PlainRefused,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens a link to the peer `expected` on `stream`. A secure link proves who answered.
pub async fn open(
    mut stream: TcpStream,
    policy: &LinkPolicy,
    expected: PeerId,
) -> Result<(LinkRead, LinkWrite), LinkError> {
    if !policy.secure() {
        let (r, w) = stream.into_split();
        return Ok((LinkRead::Plain(r), LinkWrite::Plain(w)));
    }
    let session = secure::connect(&mut stream, &policy.key, policy.swarm.as_ref(), None).await?;
    if session.remote_peer_id() != expected {
        return Err(LinkError::WrongPeer(session.remote_peer_id().short()));
    }
    let (r, w) = stream.into_split();
    let (r, w) = session.into_stream(r, w);
    Ok((LinkRead::Secure(r), LinkWrite::Secure(w)))
}

/// What the serving side learned from the start of a connection.
pub enum Accepted {
    /// A link, and the peer ID its handshake proved (`None` on a plain link: there the hello's
    /// peer ID is only a claim).
    Link(LinkRead, LinkWrite, Option<PeerId>),
    /// A plain connection: a daemon of an earlier version, or a plain one where links must
    /// be secure. The caller answers its hello with an error in the plain framing.
    Plain(OwnedReadHalf, OwnedWriteHalf),
}

/// Takes a connection: a secure handshake if it opens with one, else a plain link if this
/// daemon allows them.
pub async fn accept(mut stream: TcpStream, policy: &LinkPolicy) -> Result<Accepted, LinkError> {
    let mut first = [0u8; 4];
    // Peeking leaves the bytes for whoever reads the connection next.
    let mut seen = 0;
    while seen < first.len() {
        seen = stream.peek(&mut first).await?;
        if seen == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        if first[..seen] != secure::MAGIC[..seen] {
            break;
        }
        if seen < first.len() {
            // The start of the preamble only: wait for the rest.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    if first[..seen] != secure::MAGIC[..] {
        let (r, w) = stream.into_split();
        if policy.secure() {
            return Ok(Accepted::Plain(r, w));
        }
        return Ok(Accepted::Link(
            LinkRead::Plain(r),
            LinkWrite::Plain(w),
            None,
        ));
    }
    let session = secure::accept(&mut stream, &policy.key, policy.swarm.as_ref()).await?;
    let peer = session.remote_peer_id();
    let (r, w) = stream.into_split();
    let (r, w) = session.into_stream(r, w);
    Ok(Accepted::Link(
        LinkRead::Secure(r),
        LinkWrite::Secure(w),
        Some(peer),
    ))
}

impl LinkWrite {
    /// The socket, where chunks may go straight from the page cache (a plain link).
    pub fn plain_socket(&self) -> Option<&TcpStream> {
        match self {
            LinkWrite::Plain(w) => Some(w.as_ref()),
            LinkWrite::Secure(_) => None,
        }
    }
}

impl AsyncRead for LinkRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            LinkRead::Secure(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            LinkWrite::Secure(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            LinkWrite::Secure(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            LinkWrite::Secure(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
