//! Secure sessions: the handshake every tracker connection opens with (and every peer
//! connection in a closed swarm, or with `--encrypt`), and the encrypted stream after it.
//!
//! # Protocol
//!
//! The [Noise protocol framework](https://noiseprotocol.org/noise.html), implemented by the
//! `snow` crate: pattern `XX` (both sides send their long-lived static key, encrypted, and
//! prove they hold it), with `psk3` in a closed swarm (the swarm secret is mixed into the keys
//! after the third message, so the handshake completes only between holders of the secret, and
//! the secret never crosses the wire), over X25519, ChaCha20-Poly1305 and BLAKE2s.
//!
//! ```text
//! initiator                                   responder
//!   PREAMBLE: "P2PN", version, mode, 0, 0  ->
//!                                          <- "P2PN", version, status, 0, 0
//!   [len u16][-> e]                        ->
//!                                          <- [len u16][<- e, ee, s, es]
//!   (checks the responder's key if pinned)
//!   [len u16][-> s, se (, psk)]            ->
//!                                          <- [len u16][confirmation] or [0u16]: wrong secret
//!   then records both ways: [len u16][ciphertext of at most 65,519 bytes]
//! ```
//!
//! `mode` is [`MODE_OPEN`] or [`MODE_CLOSED`]; a responder in the other mode answers with a
//! non-zero `status` ([`Refusal`]) and closes. A side that receives something else than
//! `"P2PN"` first speaks an earlier version of the protocol, whose connections open with a
//! plain frame: the responder answers such a hello with a plain error frame (see
//! [`HandshakeError::EarlierVersion`]), so earlier daemons print a clear "upgrade" message.
//!
//! A peer's identity is its static public key: [`crate::PeerId`] is derived from it
//! ([`peer_id_of`]), so no one can speak for a peer ID without its private key.

use std::io;
use std::sync::Arc;

use snow::{HandshakeState, StatelessTransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::PeerId;

/// What every secure connection starts with.
pub const MAGIC: [u8; 4] = *b"P2PN";
/// The version of the secure session (the preamble's fifth byte).
pub const SESSION_VERSION: u8 = 1;
/// Preamble mode: an open swarm (no secret).
pub const MODE_OPEN: u8 = 0;
/// Preamble mode: a closed swarm (both sides must hold the swarm secret).
pub const MODE_CLOSED: u8 = 1;
/// Largest Noise message, and so the largest record on the wire.
const MAX_MESSAGE: usize = 65_535;
/// The authentication tag of every encrypted message.
const TAG: usize = 16;
/// Most plaintext bytes in one record.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_MESSAGE - TAG;

const PATTERN_OPEN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const PATTERN_CLOSED: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash, so a handshake of another program or version never
/// completes against ours.
const PROLOGUE: &[u8] = b"p2p secure session v1";

/// A long-lived X25519 key pair: a daemon's or a tracker's identity.
#[derive(Clone)]
pub struct Keypair {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl Keypair {
    /// A new key pair from the operating system's random source.
    pub fn generate() -> Result<Keypair, HandshakeError> {
        let builder = snow::Builder::new(params(false));
        let kp = builder.generate_keypair()?;
        Keypair::from_private(&kp.private)
    }

    /// The key pair of a stored private key (32 bytes).
    pub fn from_private(private: &[u8]) -> Result<Keypair, HandshakeError> {
        let private: [u8; 32] = private
            .try_into()
            .map_err(|_| HandshakeError::Malformed("a private key is 32 bytes".into()))?;
        // X25519's public key is the scalar product with the base point: a Noise handshake
        // with ourselves would tell it, but the dalek crate says it directly.
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
        Ok(Keypair {
            private,
            public: public.to_bytes(),
        })
    }

    /// The private key, for storing (never log it).
    pub fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// The public key: what others pin and what the peer ID is derived from.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The peer ID of this key.
    pub fn peer_id(&self) -> PeerId {
        peer_id_of(&self.public)
    }
}

/// The peer ID of a public key: the first 16 bytes of its SHA-256.
pub fn peer_id_of(public: &[u8; 32]) -> PeerId {
    let digest = crate::sha256(public);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    PeerId(id)
}

/// The pre-shared key of a closed swarm: SHA-256 of the secret under a fixed label (the
/// Noise handshake then mixes it into its own key derivation).
#[derive(Clone)]
pub struct SwarmKey([u8; 32]);

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwarmKey(..)")
    }
}

impl SwarmKey {
    /// The key of the swarm whose secret is `secret`.
    pub fn from_secret(secret: &str) -> SwarmKey {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"p2p swarm secret v1\0");
        h.update(secret.as_bytes());
        SwarmKey(h.finalize().into())
    }
}

/// Why a responder refused a handshake (the preamble's status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The responder is in a closed swarm and the initiator has no secret.
    #[error("this swarm is closed: it requires a shared secret")]
    SecretRequired,
    /// The initiator has a secret and the responder is in an open swarm.
    #[error("the other side is in an open swarm (no secret set)")]
    NotClosed,
    /// The initiator's session version is not one the responder speaks.
    #[error("unsupported session version: upgrade")]
    Version,
    /// The secrets differ.
    #[error("wrong swarm secret")]
    WrongSecret,
}

impl Refusal {
    fn code(self) -> u8 {
        match self {
            Refusal::SecretRequired => 1,
            Refusal::NotClosed => 2,
            Refusal::Version => 3,
            Refusal::WrongSecret => 4,
        }
    }

    fn from_code(code: u8) -> Refusal {
        match code {
            1 => Refusal::SecretRequired,
            2 => Refusal::NotClosed,
            4 => Refusal::WrongSecret,
            _ => Refusal::Version,
        }
    }
}

/// A handshake that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The other side opened with a plain frame: it speaks an earlier version. `first` are
    /// the four bytes read (the frame's length), for answering it in its own protocol.
    #[error("the other side speaks an earlier version of the protocol: upgrade it")]
    EarlierVersion { first: [u8; 4] },
    /// We refused the other side.
    #[error("{0}")]
    WeRefused(Refusal),
    /// The other side refused us.
    #[error("{0}")]
    Refused(Refusal),
    /// A pinned key did not match.
    #[error("the other side's key is {got}, not the pinned {expected}")]
    KeyMismatch { expected: String, got: String },
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("handshake failed: {0}")]
    Noise(#[from] snow::Error),
}

fn params(closed: bool) -> snow::params::NoiseParams {
    let pattern = if closed { PATTERN_CLOSED } else { PATTERN_OPEN };
    // Both names are constants known to snow.
    pattern
        .parse()
        .unwrap_or_else(|_| unreachable!("{pattern}"))
}

fn builder<'a>(
    key: &'a Keypair,
    swarm: Option<&'a SwarmKey>,
) -> Result<snow::Builder<'a>, HandshakeError> {
    let mut b = snow::Builder::new(params(swarm.is_some()))
        .prologue(PROLOGUE)?
        .local_private_key(&key.private)?;
    if let Some(psk) = swarm {
        b = b.psk(3, &psk.0)?;
    }
    Ok(b)
}

/// An established session: the transport keys and who is on the other side.
pub struct Session {
    transport: Arc<StatelessTransportState>,
    remote: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("remote", &hex::encode(self.remote))
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The other side's static public key, proven during the handshake.
    pub fn remote_key(&self) -> &[u8; 32] {
        &self.remote
    }

    /// The other side's peer ID.
    pub fn remote_peer_id(&self) -> PeerId {
        peer_id_of(&self.remote)
    }

    /// Wraps the two halves of the connection the handshake ran on.
    pub fn into_stream<R, W>(self, read: R, write: W) -> (SecureRead<R>, SecureWrite<W>) {
        (
            SecureRead::new(read, self.transport.clone()),
            SecureWrite::new(write, self.transport),
        )
    }
}

async fn send_message<S: AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("message over 64 KiB"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await?;
    s.flush().await
}

async fn recv_message<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    buf.resize(len, 0);
    s.read_exact(buf).await?;
    Ok(len)
}

fn remote_static(hs: &HandshakeState) -> Result<[u8; 32], HandshakeError> {
    hs.get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| HandshakeError::Malformed("no static key from the other side".into()))
}

/// Opens a session as the connecting side. With `pinned`, the responder's key must be that
/// one (checked before we send our own key).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &Keypair,
    swarm: Option<&SwarmKey>,
    pinned: Option<&[u8; 32]>,
) -> Result<Session, HandshakeError> {
    let mode = if swarm.is_some() {
        MODE_CLOSED
    } else {
        MODE_OPEN
    };
    let mut preamble = [0u8; 8];
    preamble[..4].copy_from_slice(&MAGIC);
    preamble[4] = SESSION_VERSION;
    preamble[5] = mode;
    s.write_all(&preamble).await?;
    s.flush().await?;
    let mut answer = [0u8; 8];
    s.read_exact(&mut answer[..4]).await?;
    if answer[..4] != MAGIC {
        let first = [answer[0], answer[1], answer[2], answer[3]];
        return Err(HandshakeError::EarlierVersion { first });
    }
    s.read_exact(&mut answer[4..]).await?;
    if answer[5] != 0 {
        return Err(HandshakeError::Refused(Refusal::from_code(answer[5])));
    }
    let mut hs = builder(key, swarm)?.build_initiator()?;
    let mut out = vec![0u8; MAX_MESSAGE];
    let mut inb = Vec::new();
    let n = hs.write_message(&[], &mut out)?;
    send_message(s, &out[..n]).await?;
    recv_message(s, &mut inb).await?;
    hs.read_message(&inb, &mut out)?;
    let remote = remote_static(&hs)?;
    if let Some(pinned) = pinned {
        if &remote != pinned {
            return Err(HandshakeError::KeyMismatch {
                expected: hex::encode(pinned),
                got: hex::encode(remote),
            });
        }
    }
    let n = hs.write_message(&[], &mut out)?;
    send_message(s, &out[..n]).await?;
    let transport = hs.into_stateless_transport_mode()?;
    // The confirmation: the first record, empty, under the final keys; none (an empty
    // message) if the responder could not read ours, that is, the secrets differ.
    if recv_message(s, &mut inb).await? == 0 {
        return Err(HandshakeError::Refused(Refusal::WrongSecret));
    }
    transport
        .read_message(0, &inb, &mut out)
        .map_err(|_| HandshakeError::Refused(Refusal::WrongSecret))?;
    Ok(Session {
        transport: Arc::new(transport),
        remote,
    })
}

/// Opens a session as the accepting side.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &Keypair,
    swarm: Option<&SwarmKey>,
) -> Result<Session, HandshakeError> {
    let mut preamble = [0u8; 8];
    s.read_exact(&mut preamble[..4]).await?;
    if preamble[..4] != MAGIC {
        let first = [preamble[0], preamble[1], preamble[2], preamble[3]];
        return Err(HandshakeError::EarlierVersion { first });
    }
    s.read_exact(&mut preamble[4..]).await?;
    let refusal = if preamble[4] != SESSION_VERSION {
        Some(Refusal::Version)
    } else {
        match (preamble[5], swarm.is_some()) {
            (MODE_CLOSED, true) | (MODE_OPEN, false) => None,
            (MODE_OPEN, true) => Some(Refusal::SecretRequired),
            (MODE_CLOSED, false) => Some(Refusal::NotClosed),
            _ => Some(Refusal::Version),
        }
    };
    let mut answer = [0u8; 8];
    answer[..4].copy_from_slice(&MAGIC);
    answer[4] = SESSION_VERSION;
    answer[5] = refusal.map_or(0, Refusal::code);
    s.write_all(&answer).await?;
    s.flush().await?;
    if let Some(r) = refusal {
        return Err(HandshakeError::WeRefused(r));
    }
    let mut hs = builder(key, swarm)?.build_responder()?;
    let mut out = vec![0u8; MAX_MESSAGE];
    let mut inb = Vec::new();
    recv_message(s, &mut inb).await?;
    hs.read_message(&inb, &mut out)?;
    let n = hs.write_message(&[], &mut out)?;
    send_message(s, &out[..n]).await?;
    recv_message(s, &mut inb).await?;
    if hs.read_message(&inb, &mut out).is_err() {
        // Only a different secret makes a well-formed third message unreadable here.
        let _ = send_message(s, &[]).await;
        return Err(HandshakeError::WeRefused(Refusal::WrongSecret));
    }
    let remote = remote_static(&hs)?;
    let transport = hs.into_stateless_transport_mode()?;
    let n = transport.write_message(0, &[], &mut out)?;
    send_message(s, &out[..n]).await?;
    Ok(Session {
        transport: Arc::new(transport),
        remote,
    })
}

mod stream;
#[cfg(test)]
mod tests;

pub use stream::{SecureRead, SecureWrite};
