//! Blocking secure sessions for tests that speak the protocol by hand: the real handshake
//! (`p2p_schema::secure`) on a small runtime of their own, then `Read` and `Write` over the
//! encrypted stream, so the frame helpers work on it as on a plain `TcpStream`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use p2p_schema::secure::{self, HandshakeError, Keypair, SecureRead, SecureWrite, SwarmKey};
use p2p_schema::PeerId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// No read or write of a test connection waits longer than this.
const LIMIT: Duration = Duration::from_secs(30);

/// One end of a secure session, blocking.
pub struct SecureConn {
    rt: tokio::runtime::Handle,
    read: SecureRead<OwnedReadHalf>,
    write: SecureWrite<OwnedWriteHalf>,
    /// The other side's peer ID, as its key proves.
    pub remote: PeerId,
}

/// One small runtime drives every test session's I/O (thousands of sessions need no more).
fn runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a test runtime")
        })
        .handle()
        .clone()
}

/// Opens a session to `addr` with `key` (a new one if `None`) and the swarm `secret`.
pub fn connect(
    addr: SocketAddr,
    key: Option<&Keypair>,
    secret: Option<&str>,
) -> Result<SecureConn, HandshakeError> {
    connect_on(std::net::TcpStream::connect(addr)?, key, secret)
}

/// Opens a session on a connection a test made.
pub fn connect_on(
    stream: std::net::TcpStream,
    key: Option<&Keypair>,
    secret: Option<&str>,
) -> Result<SecureConn, HandshakeError> {
    let rt = runtime();
    let fresh;
    let key = match key {
        Some(k) => k,
        None => {
            fresh = Keypair::generate()?;
            &fresh
        }
    };
    let swarm = secret.map(SwarmKey::from_secret);
    stream.set_nonblocking(true)?;
    let (session, stream) = rt.block_on(async {
        let mut stream = tokio::net::TcpStream::from_std(stream)?;
        let session = tokio::time::timeout(
            LIMIT,
            secure::connect(&mut stream, key, swarm.as_ref(), None),
        )
        .await
        .map_err(|_| timed_out())??;
        Ok::<_, HandshakeError>((session, stream))
    })?;
    Ok(wrap(rt, session, stream))
}

/// Takes a session on a connection a test accepted, as `key`, in the swarm of `secret`.
pub fn accept(
    stream: std::net::TcpStream,
    key: &Keypair,
    secret: Option<&str>,
) -> Result<SecureConn, HandshakeError> {
    let rt = runtime();
    let swarm = secret.map(SwarmKey::from_secret);
    stream.set_nonblocking(true)?;
    let (session, stream) = rt.block_on(async {
        let mut stream = tokio::net::TcpStream::from_std(stream)?;
        let session = tokio::time::timeout(LIMIT, secure::accept(&mut stream, key, swarm.as_ref()))
            .await
            .map_err(|_| timed_out())??;
        Ok::<_, HandshakeError>((session, stream))
    })?;
    Ok(wrap(rt, session, stream))
}

fn wrap(
    rt: tokio::runtime::Handle,
    session: secure::Session,
    stream: tokio::net::TcpStream,
) -> SecureConn {
    let remote = session.remote_peer_id();
    let (r, w) = stream.into_split();
    let (read, write) = session.into_stream(r, w);
    SecureConn {
        rt,
        read,
        write,
        remote,
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::TimedOut)
}

impl SecureConn {
    /// Writes raw bytes into the encrypted stream without waiting for them to be sent.
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let write = &mut self.write;
        self.rt
            .block_on(async { tokio::time::timeout(LIMIT, write.write_all(bytes)).await })
            .map_err(|_| timed_out())?
    }
}

impl Read for SecureConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = &mut self.read;
        // The timer is made inside the runtime: `block_on` enters its context.
        self.rt
            .block_on(async { tokio::time::timeout(LIMIT, read.read(buf)).await })
            .map_err(|_| timed_out())?
    }
}

impl Write for SecureConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let write = &mut self.write;
        self.rt
            .block_on(async {
                tokio::time::timeout(LIMIT, async {
                    let n = write.write(buf).await?;
                    write.flush().await?;
                    Ok(n)
                })
                .await
            })
            .map_err(|_| timed_out())?
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let write = &mut self.write;
        self.rt
            .block_on(async { tokio::time::timeout(LIMIT, write.flush()).await })
            .map_err(|_| timed_out())?
    }
}
